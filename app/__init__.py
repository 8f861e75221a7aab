"""The Gradio demo of riemann-diffusion: ``riemann-diffusion demo`` or ``python -m app``.

``app.pipeline`` does the work (no gradio import); ``app.layout.build_demo`` builds the page.
"""
