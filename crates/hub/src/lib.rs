//! Hugging Face Hub model resolution.
