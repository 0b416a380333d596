{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.nixery;

  # Option types accept exactly what `nixery serve` and `nixery gc` accept
  # (tests/test_nixos_module.py compares them), so a value that evaluates
  # also passes the build-time check.
  atLeastOne = types.addCheck types.number (x: x >= 1) // {
    description = "number at least 1";
  };
  settingsFormat = pkgs.formats.toml { };

  # A static user rather than DynamicUser: the Nix daemon matches
  # `allowed-users` by name and does not resolve systemd's dynamic users, and
  # the cache, HOME (SSH keys for git sources) and Nix's per-user state should
  # keep one owner across restarts.
  user = "nixery";
  group = "nixery";
  stateDir = "/var/lib/nixery";

  sources = lib.filterAttrs (_: value: value != null) {
    inherit (cfg)
      channel
      pkgsRepo
      pkgsPath
      flake
      ;
  };

  cacheInVarCache = lib.hasPrefix "/var/cache/" cfg.cacheDir;

  secretFiles = lib.filter (file: file != null) [
    cfg.environmentFile
    cfg.storage.s3.credentialsFile
  ];

  settingsFile = settingsFormat.generate "nixery.toml" cfg.settings;

  # `nixery gc` reads the storage the way `serve` does: the same keys.
  gcStorageKeys = [
    "storage-backend"
    "storage-path"
    "s3-bucket"
    "s3-prefix"
    "s3-endpoint"
    "s3-region"
    "s3-path-style"
  ];
  flagsFor =
    key: value:
    if value == true then
      [ "--${key}" ]
    else if value == false || value == null then
      [ ]
    else
      [
        "--${key}"
        (toString value)
      ];
  gcCommand = [
    (lib.getExe cfg.package)
    "gc"
    "--keep-days"
    (toString cfg.gc.keepDays)
    "--grace"
    (toString cfg.gc.grace)
  ]
  ++ lib.concatMap (key: flagsFor key cfg.settings.${key}) (
    lib.filter (key: cfg.settings ? ${key}) gcStorageKeys
  );

  # What the registry and its collector share: user, storage access, secrets.
  commonServiceConfig = {
    User = user;
    Group = group;
    StateDirectory = "nixery";
    StateDirectoryMode = "0750";
    WorkingDirectory = stateDir;
    UMask = "0027";
  }
  // lib.optionalAttrs cacheInVarCache {
    CacheDirectory = lib.removePrefix "/var/cache/" cfg.cacheDir;
    CacheDirectoryMode = "0750";
  }
  // lib.optionalAttrs (!cacheInVarCache) { ReadWritePaths = [ cfg.cacheDir ]; }
  // lib.optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = cfg.environmentFile; }
  // lib.optionalAttrs (cfg.storage.s3.credentialsFile != null) {
    LoadCredential = [ "s3-credentials:${cfg.storage.s3.credentialsFile}" ];
  };

  commonEnvironment = {
    HOME = stateDir;
  }
  // lib.optionalAttrs (cfg.storage.s3.credentialsFile != null) {
    AWS_SHARED_CREDENTIALS_FILE = "%d/s3-credentials";
  };

  # Hardening. Nix is reached through the daemon's socket (AF_UNIX) and
  # builds run in the daemon, so the services need no privilege.
  # MemoryDenyWriteExecute is left off: libffi (ctypes) may need W+X pages.
  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # The daemon owns the meaning of every key; the module only asks it.
  checkedConfig =
    if cfg.checkConfig == false then
      settingsFile
    else
      pkgs.runCommand "nixery-checked.toml"
        {
          nativeBuildInputs = [ cfg.package ];
          unchecked = settingsFile;
          preferLocalBuild = true;
        }
        ''
          nixery check-config ${lib.optionalString (cfg.checkConfig == "syntax-only") "--syntax-only "}"$unchecked"
          cp "$unchecked" "$out"
        '';
in
{
  options.services.nixery = {
    enable = mkEnableOption "Nixery, a container registry that builds images on demand with Nix";

    package = mkPackageOption pkgs "nixery" { };

    listenAddress = mkOption {
      type = types.str;
      default = "0.0.0.0";
      example = "127.0.0.1";
      description = "Address the registry listens on (`host`).";
    };

    port = mkOption {
      type = types.port;
      default = 8080;
      description = "Port the registry listens on.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open {option}`services.nixery.port` in the firewall.";
    };

    channel = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nixos-24.11";
      description = "Serve packages from this nixpkgs channel or commit, downloaded at run time.";
    };

    pkgsRepo = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://github.com/example/packages.git";
      description = ''
        Serve packages from this git repository. SSH keys and git
        configuration go in the service's HOME, `${stateDir}`.
      '';
    };

    pkgsPath = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./packages";
      description = ''
        Serve packages from this Nix file or directory: a package set or a
        function taking `{ system, overlays, ... }`. A Nix path is copied
        to the store; a string names a directory read at run time.
      '';
    };

    flake = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "github:example/packages";
      description = "Serve packages from this flake's `legacyPackages` or `packages`.";
    };

    overlays = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = literalExpression "[ ./overlay ]";
      description = ''
        nixpkgs overlays applied to the package source: files, or
        directories with a `default.nix`. A Nix path is copied to the store
        alone, so an overlay that imports files beside it must be given as
        its directory (copied whole). A string such as `"/srv/overlay"` is
        read at run time instead (outside the store: set
        {option}`services.nixery.checkConfig` to `"syntax-only"`).
      '';
    };

    cacheDir = mkOption {
      type = types.str;
      default = "/var/cache/nixery";
      description = ''
        Where the filesystem storage backend keeps blobs and manifests.
        Under `/var/cache` it is systemd's `CacheDirectory`; elsewhere it is
        created by tmpfiles.
      '';
    };

    storage = {
      backend = mkOption {
        type = types.enum [
          "filesystem"
          "s3"
        ];
        default = "filesystem";
        description = "Where blobs and manifests are kept (`storage-backend`).";
      };

      s3 = {
        bucket = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Bucket of the S3 backend (`s3-bucket`).";
        };
        endpoint = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "https://s3.example.com";
          description = "Endpoint URL of an S3-compatible store (`s3-endpoint`).";
        };
        region = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Region of the bucket (`s3-region`).";
        };
        credentialsFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          apply = file: if file == null then null else toString file;
          example = "/run/secrets/nixery-s3";
          description = ''
            An AWS shared credentials file, outside the Nix store. systemd
            hands it to the service with `LoadCredential`, and the service
            finds it through `AWS_SHARED_CREDENTIALS_FILE`.
          '';
        };
      };
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      apply = file: if file == null then null else toString file;
      example = "/run/secrets/nixery.env";
      description = ''
        A file of `NAME=value` lines, outside the Nix store, read by systemd
        into the service's environment: secrets such as
        `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, or any `NIXERY_*`
        variable.
      '';
    };

    popularity = mkOption {
      type = types.nullOr (types.either types.path types.str);
      default = null;
      description = "Popularity data (JSON file or URL) used to group layers.";
    };

    nixTimeout = mkOption {
      type = types.nullOr atLeastOne;
      default = null;
      example = 300;
      description = "Seconds each Nix step may take (`nix-timeout`; the daemon's default when null).";
    };

    layerBudget = mkOption {
      type = types.nullOr (types.ints.between 1 124);
      default = null;
      description = "Maximum number of package layers per image (`layer-budget`; the daemon's default when null).";
    };

    maxBuilds = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "Builds that may run at once (`max-builds`; the daemon's default when null).";
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = {
        platforms = "linux/amd64,linux/arm64";
        compression-level = 2;
      };
      description = ''
        Configuration for `nixery serve --config`: keys are the long option
        names of `nixery serve` (see `nixery serve --help`). The options
        above set their keys here.
      '';
    };

    checkConfig = mkOption {
      type = types.either types.bool (types.enum [ "syntax-only" ]);
      default = true;
      description = ''
        Check the configuration at build time with `nixery check-config`.
        `"syntax-only"` checks names and values but not that the files
        named exist, for files outside the Nix store (invisible to builds).
      '';
    };

    gc = {
      enable = mkEnableOption ''
        a timer that runs `nixery gc` on the registry's storage: images
        neither built nor served for {option}`services.nixery.gc.keepDays`
        days are removed with the blobs no kept image needs (they are built
        again when asked for). Safe while the registry serves'';

      dates = mkOption {
        type = types.str;
        default = "daily";
        example = "hourly";
        description = "When to collect, as a systemd calendar event (`OnCalendar`).";
      };

      keepDays = mkOption {
        type = types.numbers.nonnegative;
        default = 30;
        description = "Keep images built or served within this many days (`--keep-days`).";
      };

      grace = mkOption {
        type = types.numbers.nonnegative;
        default = 3600;
        description = ''
          Seconds new or expired entries are kept so that builds and pulls in
          progress finish (`--grace`); below 600 only safe when no registry
          serves the storage.
        '';
      };
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      default = checkedConfig;
      defaultText = lib.literalMD "{option}`services.nixery.settings` rendered as TOML and checked";
      description = "The file passed to `nixery serve --config`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.length (lib.attrNames sources) <= 1;
        message = "services.nixery: set at most one of channel, pkgsRepo, pkgsPath and flake; set: ${lib.concatStringsSep ", " (lib.attrNames sources)}.";
      }
      {
        assertion = cfg.storage.backend == "s3" -> cfg.storage.s3.bucket != null;
        message = "services.nixery: storage.backend = \"s3\" needs storage.s3.bucket.";
      }
      {
        assertion = lib.all (file: !lib.hasPrefix builtins.storeDir file) secretFiles;
        message = "services.nixery: environmentFile and storage.s3.credentialsFile must not be in the world-readable Nix store.";
      }
    ];

    # Builds keep their store paths alive with GC roots there: the
    # nix-daemon resolves them in its own view of the file system, where the
    # service's private /tmp does not exist.
    services.nixery.settings = {
      gc-roots-dir = lib.mkDefault "${stateDir}/gc-roots";
    }
    // lib.filterAttrs (_: value: value != null) {
      host = cfg.listenAddress;
      inherit (cfg) port channel flake;
      pkgs-repo = cfg.pkgsRepo;
      pkgs-path = cfg.pkgsPath;
      # Without a source, the system's nixpkgs: a store path, so every image
      # of it stays cacheable.
      default-pkgs-path = if sources == { } then pkgs.path else null;
      overlay = if cfg.overlays == [ ] then null else cfg.overlays;
      storage-backend = cfg.storage.backend;
      storage-path = if cfg.storage.backend == "filesystem" then cfg.cacheDir else null;
      s3-bucket = cfg.storage.s3.bucket;
      s3-endpoint = cfg.storage.s3.endpoint;
      s3-region = cfg.storage.s3.region;
      inherit (cfg) popularity;
      nix-timeout = cfg.nixTimeout;
      layer-budget = cfg.layerBudget;
      max-builds = cfg.maxBuilds;
    };

    users.users.${user} = {
      isSystemUser = true;
      inherit group;
      home = stateDir;
      description = "Nixery container registry";
    };
    users.groups.${group} = { };

    # Appended to the daemon's list; setting `allowed-users` itself would
    # replace its default of everyone.
    nix.settings.extra-allowed-users = [ user ];

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    systemd.tmpfiles.rules = mkIf (!cacheInVarCache) [ "d ${cfg.cacheDir} 0750 ${user} ${group} - -" ];

    systemd.services.nixery = {
      description = "Nixery container registry";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      requires = [ "nix-daemon.socket" ];
      environment = {
        NIX_REMOTE = "daemon";
      }
      // commonEnvironment;

      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} serve --config ${cfg.configFile}";
        Restart = "on-failure";
        RestartSec = 5;
        AmbientCapabilities = lib.optionals (cfg.port < 1024) [ "CAP_NET_BIND_SERVICE" ];
        CapabilityBoundingSet = if cfg.port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
      }
      // commonServiceConfig
      // hardening;
    };

    systemd.services.nixery-gc = mkIf cfg.gc.enable {
      description = "Nixery garbage collection";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = commonEnvironment;
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.escapeShellArgs gcCommand;
        CapabilityBoundingSet = [ "" ];
      }
      // commonServiceConfig
      // hardening;
    };

    systemd.timers.nixery-gc = mkIf cfg.gc.enable {
      description = "Nixery garbage collection";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.dates;
        Persistent = true;
        # Replicas sharing a bucket do not all collect at once.
        RandomizedDelaySec = "15min";
      };
    };
  };
}
