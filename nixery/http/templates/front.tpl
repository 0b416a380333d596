% rebase('base.tpl', title=title, host=host, refresh=refresh)
<section class="intro">
  <h1>Container images, built from their names</h1>
  <p>This is a container registry that builds images on demand with Nix. The image name is the
  list of packages: <code>{{host}}/{{example}}</code> holds a shell, git and curl.
  Pull any combination; each one is built once and then served from the cache.</p>
</section>

<section>
  <h2>Pull</h2>
  <dl class="commands">
    <dt>docker</dt>
    <dd><pre class="cmd">docker run -ti {{host}}/{{example}} bash</pre></dd>
    <dt>podman</dt>
    <dd><pre class="cmd">podman run -ti {{"--tls-verify=false " if insecure else ""}}{{host}}/{{example}} bash</pre></dd>
    <dt>nerdctl</dt>
    <dd><pre class="cmd">nerdctl run -ti {{"--insecure-registry " if insecure else ""}}{{host}}/{{example}} bash</pre></dd>
  </dl>
  % if insecure:
  <p class="note">This registry speaks plain HTTP: Docker needs <code>{{host}}</code> in
  <code>insecure-registries</code> of its <code>daemon.json</code>.</p>
  % end
</section>

<section>
  <h2>Look up a package</h2>
  <form action="/" method="get" class="lookup" role="search">
    <label for="package">Package name</label>
    <input id="package" name="package" type="text" required maxlength="100"
      pattern="[A-Za-z0-9_][A-Za-z0-9._+\-]*" placeholder="e.g. git, python3, haskellPackages.pandoc"
      autocapitalize="off" autocomplete="off" spellcheck="false">
    <button type="submit">Look up</button>
  </form>
</section>

<section>
  <h2>Names</h2>
  <ul>
    % for name, meaning in meta_packages.items():
    <li><a href="/packages/{{name}}"><code>{{name}}</code></a> {{meaning}}.</li>
    % end
    <li>Every image also holds {{", ".join(always)}}. The order of names does not matter.</li>
    <li>Dotted names reach nested sets (<code>xorg.xev</code>); names are matched case-insensitively,
    and a name that starts with a digit is looked up with a leading underscore.</li>
  </ul>
  <p>Packages come from <code>{{source}}</code>, revision <code class="rev">{{revision}}</code>.</p>
</section>

<section>
  <h2>Software bills of materials</h2>
  <p>Every image comes with an SPDX 2.3 and a CycloneDX 1.6 bill of materials listing each
  store path in it, attached to its manifest as OCI referrers. Scanners and
  <code>oras discover {{host}}/{{example}}:latest</code> find them; each built image's page
  links them.</p>
</section>

% if running:
<section>
  <h2>Building now</h2>
  % include('_running.tpl', running=running)
</section>
% end

<section>
  <h2>Recent builds</h2>
  % if builds:
  % include('_builds.tpl', builds=builds)
  <p><a href="/builds">All builds</a></p>
  % else:
  <p class="muted">Nothing built yet. Pull an image and it shows up here.</p>
  % end
</section>

% if failures:
<section>
  <h2>Recent failures</h2>
  % include('_failures.tpl', failures=failures)
</section>
% end
