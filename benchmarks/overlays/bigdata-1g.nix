# An image whose closure is over 1 GB: `bigdata1g` holds 1100 MiB of
# incompressible data (see tests/fixtures/pkgs/README.md).
final: prev: {
  bigdata1g = prev.mkBigdata 1100;
}
