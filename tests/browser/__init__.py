"""The browser tests: the course opened in JupyterLab and driven by headless Chromium (opt-in)."""
