{ pkgs ? import <nixpkgs> { } }:
pkgs.callPackage ./nix/pkgs/nixery.nix { }
