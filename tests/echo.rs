//! End to end: the /echo endpoint with real clients: message sizes, fragments,
//! control frames, protocol errors with their close codes, and two shards.

mod common;

use std::io::Write;

use common::*;
use tungstenite::Message;

#[test]
fn text_and_binary_messages_from_0_bytes_to_1_mib_come_back_intact() {
    let server = Server::start(&[
        "--echo",
        "--max-frame-size",
        "2MiB",
        "--max-message-size",
        "2MiB",
    ]);
    let mut ws = ws_connect(&server, "/echo");
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000, 1 << 20] {
        let text: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::text(text),
            "text of {len} bytes"
        );
        let binary: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
        ws.send(Message::binary(binary.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::binary(binary),
            "binary of {len} bytes"
        );
    }
    let multibyte = "κόσμε🙂".repeat(10_000);
    ws.send(Message::text(multibyte.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(multibyte));
    ws.close(None).unwrap();
}

#[test]
fn fragmented_message_with_interleaved_pings_echoes_whole() {
    let server = Server::start(&["--echo"]);
    let mut s = raw_upgrade(&server, "/echo");
    let mut wire = frame(TEXT, b"Hello, ");
    wire.extend(frame(FIN | PING, b"ping-1"));
    wire.extend(frame(0, "κόσ".as_bytes()));
    wire.extend(frame(FIN | PING, b"ping-2"));
    wire.extend(frame(FIN, "με!".as_bytes()));
    // Deliver it in small pieces so frames straddle receive buffers.
    for chunk in wire.chunks(5) {
        s.write_all(chunk).unwrap();
        s.flush().unwrap();
    }
    assert_eq!(read_frame(&mut s), Some((FIN | PONG, b"ping-1".to_vec())));
    assert_eq!(read_frame(&mut s), Some((FIN | PONG, b"ping-2".to_vec())));
    assert_eq!(
        read_frame(&mut s),
        Some((FIN | TEXT, "Hello, κόσμε!".as_bytes().to_vec()))
    );
    // A close is echoed with the same code and the server then closes TCP.
    s.write_all(&frame(FIN | CLOSE, &4000u16.to_be_bytes()))
        .unwrap();
    assert_eq!(read_close_code(&mut s), 4000);
    assert!(reaches_eof(&mut s));
}

#[test]
fn invalid_utf8_split_across_fragments_closes_1007() {
    let server = Server::start(&["--echo"]);
    let mut s = raw_upgrade(&server, "/echo");
    // U+D800 (a surrogate) encoded as ED A0 80, split over two fragments.
    s.write_all(&frame(TEXT, b"valid \xed")).unwrap();
    s.write_all(&frame(FIN, b"\xa0\x80 rest")).unwrap();
    assert_eq!(read_close_code(&mut s), 1007);
    assert!(reaches_eof(&mut s));
}

#[test]
fn protocol_violations_close_with_the_rfc_codes() {
    let server = Server::start(&["--echo"]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        (
            "RSV1 without an extension",
            frame(FIN | 0x40 | TEXT, b"x"),
            1002,
        ),
        ("reserved opcode 0x3", frame(FIN | 0x3, b""), 1002),
        ("continuation without a message", frame(FIN, b"x"), 1002),
        ("fragmented ping", frame(PING, b""), 1002),
        ("ping of 126 bytes", frame(FIN | PING, &[0; 126]), 1002),
        (
            "text then new text",
            [frame(TEXT, b"a"), frame(FIN | TEXT, b"b")].concat(),
            1002,
        ),
        (
            "close code 1005",
            frame(FIN | CLOSE, &1005u16.to_be_bytes()),
            1002,
        ),
        ("close of one byte", frame(FIN | CLOSE, &[3]), 1002),
        (
            "invalid UTF-8 close reason",
            frame(FIN | CLOSE, b"\x03\xe8\xff"),
            1007,
        ),
        (
            "frame over --max-frame-size",
            frame(FIN | BINARY, &vec![0; 70_000]),
            1009,
        ),
    ];
    for (what, wire, code) in cases {
        let mut s = raw_upgrade(&server, "/echo");
        s.write_all(&wire).unwrap();
        assert_eq!(read_close_code(&mut s), code, "{what}");
        assert!(reaches_eof(&mut s), "{what}: TCP not closed");
    }
    assert!(server.total("protocol_errors_total") >= 10);
}

#[test]
fn message_over_the_limit_closes_1009() {
    let server = Server::start(&["--echo", "--max-message-size", "100KiB"]);
    let mut s = raw_upgrade(&server, "/echo");
    s.write_all(&frame(BINARY, &vec![0; 60_000])).unwrap();
    s.write_all(&frame(0, &vec![0; 60_000])).unwrap(); // a continuation
    assert_eq!(read_close_code(&mut s), 1009);
}

#[test]
fn two_shards_both_serve_clients() {
    let server = Server::start(&["--echo", "--shards", "2"]);
    let mut clients = Vec::new();
    // SO_REUSEPORT hashes the 4-tuple: 64 connections land on both shards.
    for i in 0..64 {
        let mut ws = ws_connect(&server, "/echo");
        ws.send(Message::text(format!("client {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("client {i}")));
        clients.push(ws);
    }
    let stats = server.stats();
    let per_shard: Vec<u64> = stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(per_shard.len(), 2);
    assert_eq!(per_shard.iter().sum::<u64>(), 64);
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "one shard got nothing: {per_shard:?}"
    );
    for mut ws in clients {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    server.wait_for(
        "every connection closed",
        std::time::Duration::from_secs(10),
        |s| s.total("connections") == 0,
    );
}

#[test]
fn the_pubsub_endpoint_upgrades_and_answers_pings() {
    let server = Server::start(&[]);
    let mut s = raw_upgrade(&server, "/ws?topics=a,b");
    s.write_all(&frame(FIN | PING, b"are you there")).unwrap();
    assert_eq!(
        read_frame(&mut s),
        Some((FIN | PONG, b"are you there".to_vec()))
    );
}

/// A client that sends its Close and at once shuts down its side (a half
/// close) still gets everything owed to it, and then the server's Close. The
/// peer's FIN ended the connection at once, cancelling the send under way (here
/// a 4 MiB echo the client had not read yet) and the Close reply behind it.
#[test]
fn a_close_followed_by_a_half_close_is_answered_after_what_was_owed() {
    let server = Server::start(&[
        "--echo",
        "--shards",
        "1",
        "--max-frame-size",
        "8MiB",
        "--max-message-size",
        "8MiB",
    ]);
    let mut s = raw_upgrade(&server, "/echo");
    let big = vec![7u8; 4 << 20];
    let mut bytes = frame(FIN | BINARY, &big);
    bytes.extend_from_slice(&frame(FIN | CLOSE, &1000u16.to_be_bytes()));
    // Written by a thread: the server's echo fills the socket while we write.
    let mut writer = s.try_clone().unwrap();
    let wrote = std::thread::spawn(move || {
        writer.write_all(&bytes).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // Let the FIN arrive while the echo is still being sent.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let echoed = read_frame(&mut s).expect("the echo");
    wrote.join().unwrap();
    assert_eq!(echoed.0, FIN | BINARY);
    assert!(
        echoed.1 == big,
        "the echo came back cut: {} bytes",
        echoed.1.len()
    );
    assert_eq!(read_close_code(&mut s), 1000);
    assert!(reaches_eof(&mut s));
}
