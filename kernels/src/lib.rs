//! moeserve's CUDA kernels and their plain CPU references.
