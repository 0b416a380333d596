% for b in running:
<article class="running" id="build-{{b.id}}">
  <h3><code>{{b.image}}:{{b.tag}}</code> <span class="muted">{{b.platform}}</span></h3>
  <p><strong class="phase">{{b.phase}}</strong>
  % if b.total:
  ({{b.done}} of {{b.total}} layers)
  % end
  for {{seconds(b.elapsed())}}</p>
  % lines = b.lines()[-8:]
  % if lines:
  <pre class="log">{{"\n".join(lines)}}</pre>
  % end
</article>
% end
