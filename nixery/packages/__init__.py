"""From an image name to Nix: names, package sources, evaluation, builds and closures."""
