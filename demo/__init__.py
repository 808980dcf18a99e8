"""The demo domain: procedural captioned shapes (`demo.shapes`), their data source (`demo.sources`,
registered as the data-source kind "shapes" on import) and the scripts that trained, probed and
exported the models bundled here (demo/base, demo/upsample, demo/base_inpaint, demo/clip)."""

from demo import sources  # noqa: F401  (registers the "shapes" data source)
