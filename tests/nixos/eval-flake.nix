# Evaluates flake.nix's outputs with nixpkgs' lib and stand-in packages, and
# the VM test's machine configuration with the stub NixOS options. Needs
# --read-write-mode: the app's script is written to the store and read back.
{ libPath }:

let
  lib = import libPath;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  stubs = import ./stub-pkgs.nix { inherit lib; };
  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  fake =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = storePath name;
    }
    // attrs;

  pkgsFor =
    system:
    let
      pkgs =
        stubs
        // lib.genAttrs [
          "bashInteractive"
          "bubblewrap"
          "cacert"
          "coreutils"
          "curl"
          "git"
          "hello"
          "iana-etc"
          "moreutils"
          "nano"
          "nix"
          "nixfmt"
          "podman"
          "ruff"
          "runc"
          "skopeo"
          "umoci"
        ] (name: fake name { })
        // {
          inherit lib system;
          stdenv.hostPlatform.system = system;
          python3Packages = lib.genAttrs [ "mypy" "pytest" ] (name: fake name { });
          callPackage =
            file: args:
            fake "nixery-0.1.0" {
              callPackageOf = toString file;
              meta.mainProgram = "nixery";
            };
          writeShellApplication =
            { name, text, ... }:
            fake name {
              outPath = builtins.toFile name text;
              meta.mainProgram = name;
            };
          writeText = name: text: fake name { inherit text; };
          mkShell = attrs: fake "shell" attrs;
          testers.nixosTest = test: fake "vm-test-run-${test.name}" { inherit test; };
        };
    in
    pkgs;

  nixpkgs = {
    inherit lib;
    outPath = storePath "nixpkgs-source";
    legacyPackages = lib.genAttrs systems pkgsFor;
  };
  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; } // {
    outPath = toString ../..;
  };

  system = "x86_64-linux";
  pkgs = pkgsFor system;
  vmTest = self.checks.${system}.vm-registry.test;
  vmMachine =
    (lib.evalModules {
      modules = [
        ./stub-options.nix
        ./stub-vm-options.nix
        vmTest.nodes.machine
        { _module.args.pkgs = pkgs; }
      ];
    }).config;
  vmConfigFile = vmMachine.services.nixery.configFile;
  appProgram = self.apps.${system}.default.program;
in
{
  inherit (flake) description;
  inputs = flake.inputs.nixpkgs.url;
  outputs = lib.mapAttrs (_: value: lib.attrNames value) (
    removeAttrs self [ "outPath" ]
  );
  perSystem = lib.genAttrs systems (
    s: lib.mapAttrs (_: value: lib.attrNames value.${s}) (
      removeAttrs self [
        "outPath"
        "overlays"
        "nixosModules"
        "formatter"
      ]
    )
  );
  package = self.packages.${system}.nixery.callPackageOf;
  defaultPackage = self.packages.${system}.default.name;
  overlayPackage = ((self.overlays.default pkgs pkgs).nixery).callPackageOf;
  app = {
    inherit (self.apps.${system}.default) type meta;
    program = appProgram;
    # The stub writeShellApplication's output is the script itself.
    text = builtins.readFile (lib.removeSuffix "/bin/nixery-serve" appProgram);
  };
  lintCommand = self.checks.${system}.lint.buildCommand;
  devShellPackages = map (p: p.name) self.devShells.${system}.default.packages;
  formatter = self.formatter.${system}.name;
  vm = {
    inherit (vmTest) name testScript;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) vmMachine.assertions);
    settings = (vmConfigFile.env.unchecked or vmConfigFile).rendered;
    execStart = vmMachine.systemd.services.nixery.serviceConfig.ExecStart;
    additionalPaths = map (p: p.name) vmMachine.virtualisation.additionalPaths;
    packageSet = vmMachine.services.nixery.pkgsPath.text;
  };
}
