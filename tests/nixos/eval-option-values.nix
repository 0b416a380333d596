# Which values the module's options accept: for every probe
# `{ option = [ "layerBudget" ]; value = 125; }` in probesJSON, whether
# evaluating that option under `services.nixery` (enabled) succeeds.
#   nix-instantiate --eval --strict --json tests/nixos/eval-option-values.nix \
#     --argstr libPath /path/to/nixpkgs/lib \
#     --argstr probesJSON '[{"option":["layerBudget"],"value":125}]'
{
  libPath,
  probesJSON,
}:

let
  lib = import libPath;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  accepts =
    probe:
    let
      evaluated = lib.evalModules {
        modules = [
          ./stub-options.nix
          ../../nix/modules/nixery.nix
          {
            _module.args.pkgs = pkgs;
            services.nixery = lib.setAttrByPath probe.option probe.value // {
              enable = true;
            };
          }
        ];
      };
      value = lib.getAttrFromPath ([ "services" "nixery" ] ++ probe.option) evaluated.config;
    in
    (builtins.tryEval (builtins.deepSeq value true)).success;
in
map accepts (builtins.fromJSON probesJSON)
