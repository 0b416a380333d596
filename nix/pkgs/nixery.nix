{ lib, python3Packages, nix, git, makeWrapper }:

let
  pyproject = builtins.fromTOML (builtins.readFile ../../pyproject.toml);
in
python3Packages.buildPythonApplication {
  pname = "nixery";
  inherit (pyproject.project) version;
  pyproject = true;
  src = lib.cleanSource ../..;

  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [ bottle cheroot click isal networkx ];
  nativeBuildInputs = [ makeWrapper ];

  makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath [ nix git ]) ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.asl20;
    mainProgram = "nixery";
  };
}
