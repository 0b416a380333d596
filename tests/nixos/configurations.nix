# Module configurations the tests evaluate, by name. Paths are strings so
# nothing is copied to the store.
{
  # Only enabled: every other option at its default.
  defaults = {
    services.nixery.enable = true;
  };

  # Every option whose key `nixery serve` reads today.
  full = {
    services.nixery = {
      enable = true;
      listenAddress = "127.0.0.1";
      port = 8443;
      openFirewall = true;
      pkgsPath = "/srv/nixery/packages";
      overlays = [ "/srv/nixery/overlay.nix" ];
      cacheDir = "/srv/nixery/cache";
      popularity = "https://example.org/popularity.json";
      nixTimeout = 300;
      layerBudget = 60;
      environmentFile = "/run/secrets/nixery.env";
      checkConfig = "syntax-only";
      gc.enable = true;
      settings = {
        platforms = "linux/amd64,linux/arm64";
        compression-level = 2;
        log-level = "debug";
      };
    };
  };

  # Keys that reach the daemon through `settings` before it reads them.
  s3 = {
    services.nixery = {
      enable = true;
      flake = "github:example/packages";
      maxBuilds = 4;
      settings.s3-path-style = true;
      gc = {
        enable = true;
        dates = "hourly";
        keepDays = 7;
        grace = 1800;
      };
      storage = {
        backend = "s3";
        s3 = {
          bucket = "images";
          endpoint = "https://s3.example.org";
          region = "eu-west-1";
          credentialsFile = "/run/secrets/nixery-s3";
        };
      };
    };
  };

  privilegedPort = {
    services.nixery = {
      enable = true;
      port = 80;
      channel = "nixos-24.11";
    };
  };

  unchecked = {
    services.nixery = {
      enable = true;
      checkConfig = false;
    };
  };

  disabled = {
    services.nixery.port = 9000;
  };

  twoSources = {
    services.nixery = {
      enable = true;
      channel = "nixos-24.11";
      pkgsRepo = "https://example.org/packages.git";
    };
  };

  secretInStore = {
    services.nixery = {
      enable = true;
      environmentFile = "/nix/store/00000000000000000000000000000000-nixery.env";
    };
  };

  s3WithoutBucket = {
    services.nixery = {
      enable = true;
      storage.backend = "s3";
    };
  };
}
