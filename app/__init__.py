"""The Streamlit explorer (``streamlit run app/main.py``); its logic in :mod:`app.logic` runs without Streamlit."""
