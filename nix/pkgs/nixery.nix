{
  lib,
  python3Packages,
  nix,
  git,
}:

let
  pyproject = lib.importTOML ../../pyproject.toml;

  # "click>=8.1" -> python3Packages.click: nixpkgs names Python packages by
  # their normalised PyPI name, so pyproject.toml stays the one list to edit.
  pypiName =
    requirement:
    lib.toLower (
      builtins.replaceStrings [ "_" "." ] [ "-" "-" ] (
        builtins.head (builtins.match "[[:space:]]*([A-Za-z0-9._-]+).*" requirement)
      )
    );
  fromPyPI = requirement: python3Packages.${pypiName requirement};

  # The linters are not check inputs of the package: the flake's `lint` check
  # runs ruff; mypy and import-linter (which nixpkgs 24.11 does not package)
  # run in scripts/test.
  linters = [
    "pytest"
    "ruff"
    "mypy"
    "import-linter"
  ];
  testRequirements = lib.filter (r: !(builtins.elem (pypiName r) linters)) (
    pyproject.project.optional-dependencies.test or [ ]
  );
in
python3Packages.buildPythonApplication {
  pname = "nixery";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../pyproject.toml
      ../../README.md
      # tests/test_docs.py checks the configuration reference against the CLI.
      ../../docs
      ../../nixery
      ../../tests
      # The unit tests check the Kubernetes manifests, and the option table.
      ../../deploy
      ../../docs/configuration.md
    ];
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = map fromPyPI pyproject.project.dependencies;

  # Nixery runs nix-instantiate and nix-store, and git for git sources.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      nix
      git
    ])
  ];

  # git: the unit tests compare the ref validator with `git check-ref-format`.
  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    git
  ]
  ++ map fromPyPI testRequirements;
  # The unit tests: the `nix` and `e2e` ones need Nix, the fixture package set
  # built from the host's files, and real registry clients.
  pytestFlagsArray = [
    "-m"
    "not e2e and not nix and not repo"
  ];
  pythonImportsCheck = [ "nixery" ];

  # The expressions Nixery evaluates at run time ship as package data.
  postInstall = ''
    test -f "$out/${python3Packages.python.sitePackages}/nixery/packages/nixexprs/resolve.nix"
  '';

  meta = {
    inherit (pyproject.project) description;
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
    mainProgram = "nixery";
  };
}
