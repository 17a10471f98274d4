//! The operator's log lines, captured as its text format writes them.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use tracing_subscriber::fmt::MakeWriter;

/// Every log line of this test binary from the first `capture` on. The subscriber is the
/// global one: a per-thread one misses spans whose interest another test thread cached
/// first. Tests tell their lines apart by the app they are about.
pub struct Logs(Buffer);

impl Logs {
    pub fn capture() -> Self {
        static BUFFER: OnceLock<Buffer> = OnceLock::new();
        let buf = BUFFER.get_or_init(|| {
            let buf = Buffer::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(buf.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            if tracing::subscriber::set_global_default(subscriber).is_err() {
                panic!("another global subscriber is set");
            }
            buf
        });
        Self(buf.clone())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
