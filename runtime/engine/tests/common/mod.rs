//! What the engine's test binaries share: the fixture components built by `make wasm`.

/// The bytes of `build/components/<name>.wasm`.
pub fn component(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../build/components/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read {path} ({e}): run `make wasm` first"))
}
