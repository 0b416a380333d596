<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
% if refresh:
<meta http-equiv="refresh" content="{{refresh}}">
% end
<title>{{title}} · Nixery at {{host}}</title>
<link rel="stylesheet" href="/static/style.css">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
  <a class="brand" href="/">Nixery <span>at {{host}}</span></a>
  <nav><a href="/builds">Builds</a> <a href="/metrics">Metrics</a> <a href="/healthz">Health</a></nav>
</header>
<main>
{{!base}}
</main>
<footer>A container registry that builds images on demand with Nix.</footer>
</body>
</html>
