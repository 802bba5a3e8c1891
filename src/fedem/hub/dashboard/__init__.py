"""The community dashboard the hub serves at `/dashboard`: server-rendered HTML (Jinja2) with a little
JavaScript, no build step. `views` reads the database, `plots` draws SVG, `routes/dashboard.py` serves."""
