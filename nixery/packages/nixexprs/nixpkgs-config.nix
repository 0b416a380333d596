# The nixpkgs config of every evaluation (through NIXPKGS_CONFIG): nixpkgs'
# defaults, rather than the server's ~/.config/nixpkgs/config.nix, which would
# change packages without changing the pinned revision they are cached under.
{ }
