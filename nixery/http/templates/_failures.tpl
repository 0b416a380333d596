% for r in failures:
<details class="failure">
  <summary><code>{{r.image}}:{{r.tag}}</code> · {{r.error or "failed"}} ·
  <time datetime="{{iso(r.started_at)}}" title="{{iso(r.started_at)}}">{{ago(r.started_at)}}</time></summary>
  % if r.log:
  <pre class="log">{{r.log}}</pre>
  % else:
  <p class="muted">Nix printed nothing.</p>
  % end
</details>
% end
