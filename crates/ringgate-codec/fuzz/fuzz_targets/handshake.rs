//! The upgrade request parser on arbitrary bytes: it never panics, a complete
//! head's length is within the input, every prefix of a complete head is
//! "incomplete", and a valid upgrade's 101 names the chosen subprotocol.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate_codec::{parse_request, write_switching_protocols};

const PROTOCOLS: &[&str] = &["ringgate.v1", "chat"];

fuzz_target!(|data: &[u8]| {
    let Ok(Some(request)) = parse_request(data, PROTOCOLS) else {
        return;
    };
    assert!(request.head_len <= data.len());
    assert!(request.path.starts_with('/'), "{:?}", request.path);
    // A strict prefix of the head is never a complete request.
    let cut = request.head_len / 2;
    assert!(!matches!(
        parse_request(&data[..cut], PROTOCOLS),
        Ok(Some(_))
    ));
    if let Some(p) = request.protocol {
        assert!(PROTOCOLS.contains(&p));
    }
    if let Ok(key) = request.upgrade {
        let mut out = Vec::new();
        write_switching_protocols(&key, request.protocol, &mut out);
        let text = String::from_utf8(out).expect("the 101 is ASCII");
        assert!(text.starts_with("HTTP/1.1 101 ") && text.ends_with("\r\n\r\n"));
        if let Some(p) = request.protocol {
            assert!(text.contains(&format!("\r\nSec-WebSocket-Protocol: {p}\r\n")));
        }
    }
});
