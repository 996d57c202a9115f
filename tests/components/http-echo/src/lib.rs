//! Test fixture: a standard `wasi:http/proxy` component (see README.md).

use std::io::{Read, Write};

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, OutputStream, ResponseOutparam,
};

wasi::http::proxy::export!(HttpEcho);

struct HttpEcho;

/// Largest chunk read or written at once.
const CHUNK: usize = 64 * 1024;

impl Guest for HttpEcho {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_and_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query.as_str(), ""));
        let last = path.rsplit('/').next().unwrap_or_default();
        match last {
            "stream" => stream_echo(request, out),
            "big" => respond(out, 200, "application/octet-stream", |body| {
                let size = query_number(query, "bytes").unwrap_or(0);
                let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
                let mut written = 0;
                while written < size {
                    // Each chunk continues the pattern where the previous one stopped.
                    let offset = written % 251;
                    let len = (size - written).min(CHUNK - 251);
                    write(body, &pattern[offset..offset + len]);
                    written += len;
                }
            }),
            "status" => {
                let code = query_number(query, "code").unwrap_or(200) as u16;
                respond(out, code, "text/plain", |_| {});
            }
            "trap" => panic!("http-echo was asked to trap"),
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            _ => respond(out, 200, "text/plain", |body| {
                write(body, b"hello from wasi:http\n");
            }),
        }
    }
}

fn query_number(query: &str, name: &str) -> Option<usize> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

fn headers(content_type: &str) -> Fields {
    let fields = Fields::new();
    let _ = fields.append("content-type", content_type.as_bytes());
    let _ = fields.append("x-fixture", b"http-echo");
    fields
}

/// Set the response, let `fill` write the body, finish it.
fn respond(
    out: ResponseOutparam,
    status: u16,
    content_type: &str,
    fill: impl FnOnce(&mut OutputStream),
) {
    let response = OutgoingResponse::new(headers(content_type));
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(mut stream) = body.write() {
        fill(&mut stream);
        drop(stream);
    }
    let _ = OutgoingBody::finish(body, None);
}

/// Write all of `bytes` (blocking while the host's buffer is full) and flush, so the chunk
/// leaves now. The client may have gone; then there is nobody to tell.
fn write(stream: &mut OutputStream, bytes: &[u8]) {
    if Write::write_all(stream, bytes).is_ok() {
        let _ = Write::flush(stream);
    }
}

/// Echo the request body, flushing every chunk as soon as it arrives.
fn stream_echo(request: IncomingRequest, out: ResponseOutparam) {
    let Ok(incoming) = request.consume() else {
        return respond(out, 400, "text/plain", |_| {});
    };
    respond(out, 200, "application/octet-stream", |body| {
        let Ok(mut input) = incoming.stream() else {
            return;
        };
        let mut buffer = vec![0; CHUNK];
        loop {
            match Read::read(&mut input, &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => write(body, &buffer[..n]),
            }
        }
    });
}
