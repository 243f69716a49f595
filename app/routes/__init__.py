"""HTTP routes: thin functions that parse a request, call one page builder and render."""
