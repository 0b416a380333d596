# Stand-ins for the parts of nixpkgs the module uses. Derivations are plain
# attribute sets with fixed store paths; `formats.toml` has nixpkgs' type and
# a `generate` that keeps the value it would render, so tests can read it.
{ lib }:

let
  inherit (lib) types;
  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  derivation =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = storePath name;
    }
    // attrs;
in
{
  path = storePath "nixpkgs-source";

  nixery = derivation "nixery-0.1.0" { meta.mainProgram = "nixery"; };

  formats.toml =
    { }:
    {
      type =
        let
          valueType =
            types.oneOf [
              types.bool
              types.int
              types.float
              types.str
              types.path
              (types.attrsOf valueType)
              (types.listOf valueType)
            ]
            // {
              description = "TOML value";
            };
        in
        valueType;
      generate = name: value: derivation name { rendered = value; };
    };

  runCommand =
    name: env: buildCommand:
    derivation name { inherit env buildCommand; };
}
