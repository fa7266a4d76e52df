//! End to end: a tiny provided-buffer ring under 200 concurrent echo clients.
//! Running out of buffers must be back-pressure (the recv is re-armed later and
//! the bytes wait in the socket), never loss.

mod common;

use std::sync::{Arc, Barrier};

use std::io::Write;

use common::*;
use tungstenite::Message;

#[test]
fn a_starved_buffer_ring_loses_no_byte() {
    const CLIENTS: usize = 200;
    const MESSAGES: usize = 20;
    let server = Server::start(STARVED_RING);
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut ws = ws_connect(&server, "/echo");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                // Send a burst first, so many clients have bytes waiting at once.
                let messages: Vec<Vec<u8>> = (0..MESSAGES)
                    .map(|m| {
                        (0..(c * 37 + m * 101) % 3000 + 1)
                            .map(|i| (i ^ c ^ m) as u8)
                            .collect()
                    })
                    .collect();
                for m in &messages {
                    ws.send(Message::binary(m.clone())).unwrap();
                }
                for (i, m) in messages.iter().enumerate() {
                    let got = ws.read().unwrap();
                    assert_eq!(
                        got.into_data().as_ref(),
                        m.as_slice(),
                        "client {c} message {i}"
                    );
                }
                ws.close(None).unwrap();
                while ws.read().is_ok() {}
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client saw a wrong or missing echo");
    }
    let stats = server.stats();
    assert_eq!(
        stats["totals"]["messages_sent_total"].as_u64(),
        Some((CLIENTS * MESSAGES) as u64)
    );
    assert!(
        stats["totals"]["buffer_ring_exhausted_total"]
            .as_u64()
            .unwrap()
            > 0,
        "the ring never ran dry, so this test did not test the ENOBUFS path: {stats}"
    );
}

#[test]
fn a_client_that_does_not_read_its_echoes_is_paused_not_dropped() {
    const MESSAGES: usize = 256;
    const SIZE: usize = 16 * 1024;
    let server = Server::start(&["--echo", "--shards", "1", "--send-queue-limit", "64KiB"]);
    let mut reader = raw_upgrade(&server, "/echo");
    let mut writer = reader.try_clone().unwrap();
    let payload = |i: usize| -> Vec<u8> { (0..SIZE).map(|j| (i * 7 + j) as u8).collect() };
    // Write 4 MiB of messages while nobody reads the echoes: the server's send
    // queue passes its limit and its reads of this client pause.
    let writing = std::thread::spawn(move || {
        for i in 0..MESSAGES {
            writer.write_all(&frame(FIN | BINARY, &payload(i))).unwrap();
        }
    });
    server.wait_for("reads to pause", std::time::Duration::from_secs(20), |s| {
        s.total("reads_paused_total") > 0
    });
    // Reading now drains everything, in order; nothing was dropped.
    for i in 0..MESSAGES {
        assert_eq!(
            read_frame(&mut reader),
            Some((FIN | BINARY, payload(i))),
            "echo {i}"
        );
    }
    writing.join().unwrap();
}
