{ writeShellScriptBin }:
(writeShellScriptBin "internal-tool" ''
  echo "an internal tool"
'').overrideAttrs
  {
    pname = "internal-tool";
    version = "1.0";
    meta.description = "A package only an overlay has";
  }
