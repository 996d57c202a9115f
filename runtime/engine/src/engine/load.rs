//! Loading: component bytes → checked, compiled, pre-linked [`FunctionCode`].

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;

use super::Engine;
use super::invoke::HostState;
use crate::world::{EventHandlerPre, HANDLER_EXPORT};

/// Why component bytes cannot become a function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Larger than `EngineConfig::max_component_bytes`.
    #[error("component is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Size of what was offered.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Not WebAssembly at all (no `\0asm` header).
    #[error("not a WebAssembly binary: {reason}")]
    NotWasm {
        /// What was found instead.
        reason: String,
    },
    /// A core WebAssembly module, which has no WIT world to check or call.
    #[error(
        "this is a core WebAssembly module, not a component: build the function for \
         wasm32-wasip2 (or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    /// WebAssembly with a version or layer this engine does not know.
    #[error("unsupported WebAssembly binary version {version:#06x}, layer {layer}")]
    UnsupportedEncoding {
        /// The version field of the header.
        version: u16,
        /// The layer field of the header (0 = core module, 1 = component).
        layer: u16,
    },
    /// A component that fails validation or compilation.
    #[error("invalid component: {reason}")]
    Invalid {
        /// wasmtime's explanation.
        reason: String,
    },
    /// A component that does not export the `handler` interface of the `event-handler`
    /// world (at a version this host can call).
    #[error("component does not target {expected}; it exports {found:?}")]
    WorldMismatch {
        /// The export the host calls.
        expected: String,
        /// What the component exports instead.
        found: Vec<String>,
    },
    /// A component importing something the host does not provide (e.g. `wasi:http`
    /// outgoing requests, or a Patchbay interface of another version).
    #[error("component imports {import:?}, which this host does not provide: {reason}")]
    UnsatisfiedImport {
        /// The import's name, as far as it could be determined.
        import: String,
        /// wasmtime's explanation.
        reason: String,
    },
}

/// Where a [`FunctionCode`]'s machine code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeOrigin {
    /// Compiled with Cranelift by this process.
    Compiled,
    /// Read from the engine's on-disk compile cache.
    DiskCache,
}

/// A compiled, checked and pre-linked function, ready to instantiate once per event.
/// Cheap to clone; while any clone lives, [`Engine::load`] of the same bytes returns it
/// without compiling again.
#[derive(Clone)]
pub struct FunctionCode {
    pub(super) inner: Arc<CodeInner>,
}

pub(super) struct CodeInner {
    pub(super) digest: String,
    pub(super) size: usize,
    pub(super) origin: CodeOrigin,
    pub(super) pre: EventHandlerPre<HostState>,
}

impl FunctionCode {
    /// Lower-case hex sha256 of the component bytes (the artifact store's key).
    #[must_use]
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Size of the component bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// Where its machine code came from.
    #[must_use]
    pub fn origin(&self) -> CodeOrigin {
        self.inner.origin
    }
}

impl fmt::Debug for FunctionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionCode")
            .field("digest", &self.inner.digest)
            .field("size", &self.inner.size)
            .field("origin", &self.inner.origin)
            .finish()
    }
}

impl Engine {
    /// Check, compile and pre-link a component.
    ///
    /// Compiling is CPU-bound and can take seconds for a large component: call this from
    /// a blocking context (`tokio::task::spawn_blocking`). Bytes already loaded (same
    /// sha256) and still held somewhere come back at once.
    pub fn load(&self, bytes: &[u8]) -> Result<FunctionCode, LoadError> {
        let max = self.inner.config.max_component_bytes;
        if bytes.len() > max {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        check_header(bytes)?;
        let digest = digest_of(bytes);
        if let Some(code) = self.loaded(&digest) {
            return Ok(code);
        }
        let (component, origin) = self.compile_or_read_cache(&digest, bytes)?;
        let pre = self.link(&component)?;
        let code = FunctionCode {
            inner: Arc::new(CodeInner {
                digest: digest.clone(),
                size: bytes.len(),
                origin,
                pre,
            }),
        };
        let mut loaded = self
            .inner
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loaded.retain(|_, code| code.strong_count() > 0);
        loaded.insert(digest, Arc::downgrade(&code.inner));
        Ok(code)
    }

    /// The code loaded from bytes with this sha256 (lower-case hex), if still held.
    #[must_use]
    pub fn loaded(&self, digest: &str) -> Option<FunctionCode> {
        let loaded = self
            .inner
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let inner = loaded.get(digest)?.upgrade()?;
        Some(FunctionCode { inner })
    }

    pub(super) fn compile_or_read_cache(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(Component, CodeOrigin), LoadError> {
        let Some(dir) = &self.inner.config.cache_dir else {
            return Ok((self.compile(bytes)?, CodeOrigin::Compiled));
        };
        let path = self.cache_path(dir, digest);
        match std::fs::read(&path) {
            Ok(serialized) => match deserialize(&self.inner.wasmtime, &serialized) {
                Ok(component) => return Ok((component, CodeOrigin::DiskCache)),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %format!("{e:#}"),
                    "ignoring unusable compile cache entry"
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "failed to read compile cache entry"
            ),
        }
        let component = self.compile(bytes)?;
        match component.serialize() {
            Ok(serialized) => {
                if let Err(e) = write_atomically(&path, &serialized) {
                    tracing::warn!(path = %path.display(), error = %e, "failed to write compile cache entry");
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "failed to serialize compiled component")
            }
        }
        Ok((component, CodeOrigin::Compiled))
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        Component::new(&self.inner.wasmtime, bytes).map_err(|e| LoadError::Invalid {
            reason: format!("{e:#}"),
        })
    }

    /// Check the world, then resolve every import against the linker once, so that each
    /// invocation only allocates and initialises.
    fn link(&self, component: &Component) -> Result<EventHandlerPre<HostState>, LoadError> {
        let engine = &self.inner.wasmtime;
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let world_mismatch = || LoadError::WorldMismatch {
            expected: HANDLER_EXPORT.to_owned(),
            found: exports.clone(),
        };
        // Any version of the handler interface gets past this quick check; whether this
        // host can call that version is decided below by the typed lookup.
        let handler_interface = HANDLER_EXPORT.split('@').next().unwrap_or(HANDLER_EXPORT);
        if !exports
            .iter()
            .any(|name| name.split('@').next() == Some(handler_interface))
        {
            return Err(world_mismatch());
        }
        let instance_pre = self.inner.linker.instantiate_pre(component).map_err(|e| {
            let reason = format!("{e:#}");
            let import = ty
                .imports(engine)
                .map(|(name, _)| name)
                .find(|name| reason.contains(name))
                .unwrap_or("<unknown>")
                .to_owned();
            LoadError::UnsatisfiedImport { import, reason }
        })?;
        EventHandlerPre::new(instance_pre).map_err(|_| world_mismatch())
    }
}

/// Lower-case hex sha256 of component bytes.
pub(super) fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Tell "not wasm", "core module" and "component" apart by the 8-byte header, so that the
/// error names the real problem instead of a validation failure.
pub(super) fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8; 4] = b"\0asm";
    const CORE_VERSION: u16 = 1;
    const CORE_LAYER: u16 = 0;
    const COMPONENT_VERSION: u16 = 0x0d;
    const COMPONENT_LAYER: u16 = 1;
    let Some((magic, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(LoadError::NotWasm {
            reason: format!("only {} bytes", bytes.len()),
        });
    };
    if magic != MAGIC {
        let reason = if bytes.starts_with(b"(") || bytes.starts_with(b";;") {
            "looks like WebAssembly text; compile it to a binary component first".to_owned()
        } else {
            format!("starts with {:02x?} instead of the `\\0asm` magic", magic)
        };
        return Err(LoadError::NotWasm { reason });
    }
    let Some(([v0, v1, l0, l1], _)) = rest.split_first_chunk::<4>().map(|(h, r)| (*h, r)) else {
        return Err(LoadError::NotWasm {
            reason: "truncated header".to_owned(),
        });
    };
    let version = u16::from_le_bytes([v0, v1]);
    let layer = u16::from_le_bytes([l0, l1]);
    match (version, layer) {
        (CORE_VERSION, CORE_LAYER) => Err(LoadError::CoreModule),
        (COMPONENT_VERSION, COMPONENT_LAYER) => Ok(()),
        (version, layer) => Err(LoadError::UnsupportedEncoding { version, layer }),
    }
}

/// Load a component compiled earlier by [`Component::serialize`].
#[allow(unsafe_code)]
fn deserialize(engine: &wasmtime::Engine, serialized: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` trusts its input to be machine code produced by
    // wasmtime. The bytes come from the engine's cache directory, which the runtime
    // created private (0700) and fills only with `Component::serialize` output, written to
    // a temporary file and renamed into place (never seen half-written). wasmtime itself
    // rejects files from another wasmtime version or an incompatible engine
    // configuration, and the file name carries the engine's compatibility hash. The cache
    // directory must be as trusted as the runtime binary (see `EngineConfig::cache_dir`).
    unsafe { Component::deserialize(engine, serialized) }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp.{}.{sequence}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_names_the_kind_of_binary() {
        assert_eq!(
            check_header(b"\0asm\x01\0\0\0rest"),
            Err(LoadError::CoreModule)
        );
        assert_eq!(check_header(b"\0asm\x0d\0\x01\0rest"), Ok(()));
        assert_eq!(
            check_header(b"\0asm\x0e\0\x01\0"),
            Err(LoadError::UnsupportedEncoding {
                version: 0x0e,
                layer: 1
            })
        );
        assert!(matches!(
            check_header(b"\0as"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(b"\0asm\x01"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(b"(component)"),
            Err(LoadError::NotWasm { reason }) if reason.contains("text")
        ));
    }
}
