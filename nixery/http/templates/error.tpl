% rebase('base.tpl', title=title, host=host, refresh=refresh)
<h1>{{title}}</h1>
<p>{{message}}</p>
<p><a href="/">Back to the front page</a></p>
