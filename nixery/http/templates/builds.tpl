% rebase('base.tpl', title=title, host=host, refresh=refresh)
<h1>Builds</h1>
<section>
  <h2>Building now</h2>
  % if running:
  % include('_running.tpl', running=running)
  <p class="muted">This page reloads every few seconds while builds run.</p>
  % else:
  <p class="muted">Nothing is being built.</p>
  % end
</section>
<section>
  <h2>Finished</h2>
  % if builds:
  % include('_builds.tpl', builds=builds)
  % else:
  <p class="muted">Nothing built yet.</p>
  % end
</section>
<section>
  <h2>Failed</h2>
  % if failures:
  % include('_failures.tpl', failures=failures)
  % else:
  <p class="muted">No failures.</p>
  % end
</section>
