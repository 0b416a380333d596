# Nixery as a NixOS service: the module serves a small package set, skopeo
# pulls `shell/hello` and podman runs it.
{
  pkgs,
  nixosModule,
}:

let
  inherit (pkgs) lib;

  # Every package `shell/hello` needs, `shell` and the always-included ones.
  packages = [
    "hello"
    "bashInteractive"
    "coreutils"
    "moreutils"
    "nano"
    "cacert"
    "iana-etc"
  ];

  # The package set evaluates this very nixpkgs, so its derivations have the
  # outputs put in the VM's store below: Nix finds them valid and builds
  # nothing (the VM has no network).
  packageSet = pkgs.writeText "nixery-test-packages.nix" ''
    { system ? builtins.currentSystem, overlays ? [ ], ... }:
    let
      pkgs = import ${pkgs.path} { inherit system overlays; config = { }; };
    in
    { inherit (pkgs) ${lib.concatStringsSep " " packages}; }
  '';
in
pkgs.testers.nixosTest {
  name = "nixery-registry";

  nodes.machine = {
    imports = [ nixosModule ];

    services.nixery = {
      enable = true;
      pkgsPath = packageSet;
      nixTimeout = 600;
      settings.log-level = "debug";
    };

    nix.settings.substituters = lib.mkForce [ ];
    virtualisation = {
      additionalPaths = map (name: pkgs.${name}) packages;
      memorySize = 2048;
      diskSize = 4096;
      podman.enable = true;
    };
    environment.systemPackages = [
      pkgs.curl
      pkgs.skopeo
    ];
  };

  testScript = ''
    machine.wait_for_unit("nixery.service")
    machine.wait_for_open_port(8080)
    machine.succeed("curl --fail --silent http://127.0.0.1:8080/v2/")

    with subtest("skopeo pulls the image"):
        machine.succeed(
            "skopeo copy --src-tls-verify=false "
            "docker://127.0.0.1:8080/shell/hello oci:/tmp/hello:latest"
        )

    with subtest("podman runs it"):
        out = machine.succeed(
            "podman run --rm --tls-verify=false --network none "
            "127.0.0.1:8080/shell/hello hello"
        )
        assert "Hello, world!" in out, out

    with subtest("blobs are kept in the cache directory, owned by the service user"):
        machine.succeed("test -n \"$(ls -A /var/cache/nixery)\"")
        machine.succeed("stat -c %U /var/cache/nixery | grep -x nixery")
        machine.succeed("systemctl show -p NRestarts --value nixery.service | grep -x 0")
  '';
}
