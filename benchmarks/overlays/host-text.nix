# Three packages of the host's text files: vim's runtime, Perl's library and
# CMake's modules (about 80 MB, compressible like most of an image). With
# them the reference image is over 100 MB in 35 layers (see benchmarks/build.py).
final: prev:
let
  copy = pname: source: description:
    (derivation {
      inherit pname source;
      name = "${pname}-host";
      system = prev.hello.system;
      builder = "/bin/busybox";
      args = [ "sh" "-c" "/bin/busybox mkdir -p $out/share && /bin/busybox cp -rL $source $out/share/${pname}" ];
    }) // {
      inherit pname;
      version = "host";
      meta = { inherit description; };
    };
in
{
  vimfiles = copy "vim" "/usr/share/vim/vim90" "vim's runtime files";
  perlfiles = copy "perl" "/usr/share/perl/5.36.0" "Perl's library";
  cmakefiles = copy "cmake" "/usr/share/cmake-3.25" "CMake's modules";
}
