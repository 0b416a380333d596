<div class="scroll">
<table class="builds">
<thead><tr><th>image:tag</th><th>when</th><th>took</th><th>layers</th><th>size</th></tr></thead>
<tbody>
% for r in builds:
<tr>
  <td><a href="/images/{{r.key}}"><code>{{r.image}}</code></a><span class="tag">:{{r.tag}}</span></td>
  <td><time datetime="{{iso(r.started_at)}}" title="{{iso(r.started_at)}}">{{ago(r.started_at)}}</time></td>
  <td class="num">{{seconds(r.duration)}}</td>
  <td class="num">{{r.layers}}</td>
  <td class="num">{{size(r.size)}}</td>
</tr>
% end
</tbody>
</table>
</div>
