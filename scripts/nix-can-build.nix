# The smallest derivation: proves that Nix can run a builder on this machine.
# `nonce` makes each check a new derivation, so it is really built.
{ nonce }:
derivation {
  name = "nixery-nix-check";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${nonce} > $out" ];
}
