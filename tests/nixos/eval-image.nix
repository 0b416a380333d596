# Evaluates nix/pkgs/image.nix with stand-ins for the few nixpkgs functions it
# calls; needs neither nixpkgs nor its lib. `buildLayeredImage` returns its
# arguments, so the tests read the image's configuration as the manifests in
# deploy/kubernetes see it.
let
  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  package = name: {
    inherit name;
    outPath = storePath name;
    meta.mainProgram = name;
  };
in
import ../../nix/pkgs/image.nix {
  lib.getExe = p: "${p}/bin/${p.meta.mainProgram}";
  dockerTools = {
    buildLayeredImage = attrs: attrs;
    fakeNss = package "fake-nss";
  };
  # No outPath, so that the file's text shows in the evaluated contents.
  writeTextDir = path: text: { inherit path text; };
  nixery = package "nixery";
  nix = package "nix";
  bashInteractive = package "bash";
  coreutils = package "coreutils";
  cacert = package "cacert";
  git = package "git";
}
