% rebase('base.tpl', title=title, host=host, refresh=refresh)
<h1><code>{{query}}</code></h1>
<p class="found">A name with a special meaning: it {{meaning}}.</p>
<pre class="cmd">docker pull {{host}}/{{query}}/hello</pre>
