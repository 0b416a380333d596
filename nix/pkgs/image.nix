# A container image of Nixery that builds images itself: Nixery, Nix, and
# what Nix needs to fetch package sets (certificates, git). It runs as root
# in the container, with Nix in single-user mode and no build users; the
# container is the isolation. Used by deploy/kubernetes.
#
#   pkgs.callPackage ./nix/pkgs/image.nix { nixery = <the nixery package>; }
{
  lib,
  dockerTools,
  writeTextDir,
  nixery,
  nix,
  bashInteractive,
  coreutils,
  cacert,
  git,
  tag ? null,
}:

let
  nixConf = writeTextDir "etc/nix/nix.conf" ''
    build-users-group =
    sandbox = false
  '';
  certs = "${cacert}/etc/ssl/certs/ca-bundle.crt";
in
dockerTools.buildLayeredImage {
  name = "nixery";
  inherit tag;
  contents = [
    nixery
    nix
    bashInteractive
    coreutils
    git
    cacert
    nixConf
    dockerTools.fakeNss
  ];
  # Nix inside the container must know the paths the image already holds.
  includeNixDB = true;
  extraCommands = ''
    mkdir -p tmp root var/cache/nixery
    chmod 1777 tmp
  '';
  config = {
    Entrypoint = [ (lib.getExe nixery) "serve" ];
    Env = [
      "HOME=/root"
      "USER=root"
      "PATH=/bin"
      "XDG_CACHE_HOME=/var/cache"
      "NIXERY_STORAGE_PATH=/var/cache/nixery"
      "SSL_CERT_FILE=${certs}"
      "NIX_SSL_CERT_FILE=${certs}"
      "GIT_SSL_CAINFO=${certs}"
    ];
    ExposedPorts."8080/tcp" = { };
  };
}
