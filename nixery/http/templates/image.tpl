% rebase('base.tpl', title=title, host=host, refresh=refresh)
<h1>Image <code>{{title}}</code></h1>
<p>{{len(image.layers)}} layers, {{size(total)}} compressed.
% if records:
Built <time datetime="{{iso(records[0].started_at)}}" title="{{iso(records[0].started_at)}}">{{ago(records[0].started_at)}}</time>
in {{seconds(records[0].duration)}} for {{records[0].platform}}.
% end
</p>
% if records:
<pre class="cmd">docker pull {{host}}/{{records[0].image}}:{{records[0].tag}}</pre>
% end

<h2>Packages</h2>
<ul class="packages">
% for name in image.packages:
  <li><a href="/packages/{{name}}"><code>{{name}}</code></a></li>
% end
</ul>

<h2>Layers</h2>
<figure>
<div class="scroll">
<svg class="layers" viewBox="0 0 {{chart.width}} {{chart.height}}" role="img"
  aria-label="Layer sizes" xmlns="http://www.w3.org/2000/svg">
% for row in chart.rows:
  <g class="layer">
    <title>{{row.title}}</title>
    <text x="0" y="{{row.y + 16}}">{{row.label}}</text>
    <rect x="0" y="{{row.y + bar_y}}" width="{{row.width}}" height="{{bar_height}}" rx="2"></rect>
  </g>
% end
</svg>
</div>
<figcaption>Each bar is one layer, as long as its share of the largest; layers clients can
share with other images come first.</figcaption>
</figure>

<div class="scroll">
<table class="layers">
<thead><tr><th>#</th><th>size</th><th>store paths</th></tr></thead>
<tbody>
% for number, layer in enumerate(image.layers, 1):
<tr>
  <td>{{number}}</td>
  <td class="num">{{size(layer.size)}}</td>
  <td>
  % if layer.paths:
    % for path in layer.paths:
    <code class="path" title="{{path}}">{{store_name(path)}}</code>
    % end
  % else:
    <span class="muted">root file system: symlinks to the packages, /etc, /tmp</span>
  % end
  <br><code class="digest" title="{{layer.digest}}">{{layer.digest[:19]}}…</code>
  </td>
</tr>
% end
</tbody>
</table>
</div>

<h2>Manifests</h2>
<ul>
% for fmt, desc in sorted(image.manifests.items()):
  <li>{{fmt}}: <code class="digest">{{desc.digest}}</code></li>
% end
</ul>

<h2>Software bills of materials</h2>
% if sboms:
<p>Every store path of the image, with its version, NAR hash, licence and homepage where
the package set knows them, and the references between them. Each manifest has its own,
attached as OCI referrers: clients list them with
% if records:
<code>oras discover {{host}}/{{records[0].image}}:{{records[0].tag}}</code>.</p>
% else:
the referrers API.</p>
% end
<ul class="sboms">
% for fmt, files in sorted(sboms.items()):
  % for filename, blob in files:
  <li>{{fmt}} manifest: <a href="/images/{{key}}/sbom/{{blob.digest}}" download="{{filename}}">{{filename}}</a>
    <span class="muted">({{blob.media_type}}, {{size(blob.size)}})</span></li>
  % end
% end
</ul>
% else:
<p class="muted">This image was built before bills of materials were made; pulling it again adds them.</p>
% end
