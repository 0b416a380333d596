% rebase('base.tpl', title=title, host=host, refresh=refresh)
% info = lookup.info
% if info:
<h1><code>{{info.attr_path}}</code> <span class="version">{{info.version or ""}}</span></h1>
<p class="found">In the package set.</p>
<p>{{info.description or "No description."}}</p>
  % name = lookup.image_name
  % if name:
<h2>Pull</h2>
<pre class="cmd">docker pull {{host}}/{{name}}</pre>
<pre class="cmd">podman run -ti {{"--tls-verify=false " if insecure else ""}}{{host}}/shell/{{name}} bash</pre>
  % else:
<p class="note">This attribute cannot be written as an image name.</p>
  % end
% elif lookup.refused:
<h1><code>{{lookup.query}}</code></h1>
<p class="refused">In the package set, but it refuses to evaluate, so it cannot be pulled. Nix says:</p>
<pre class="reason">{{lookup.refused}}</pre>
<p class="note">{{refusal_hint}}</p>
% else:
<h1><code>{{lookup.query}}</code></h1>
<p class="missing">Not in the package set.</p>
  % if suggestions:
<p>Did you mean:</p>
<ul class="suggestions">
    % for attr, name in suggestions:
  <li><a href="/packages/{{name or attr}}"><code>{{attr}}</code></a></li>
    % end
</ul>
  % end
% end
<form action="/" method="get" class="lookup" role="search">
  <label for="package">Look up another</label>
  <input id="package" name="package" type="text" required maxlength="100" value="{{lookup.query}}"
    autocapitalize="off" autocomplete="off" spellcheck="false">
  <button type="submit">Look up</button>
</form>
