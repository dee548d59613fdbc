"""The Streamlit atlas app. Not built yet: see the roadmap in README.md."""
