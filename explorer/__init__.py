"""GPT Explorer's Streamlit app: `streamlit run explorer/app.py` from the repository root."""
