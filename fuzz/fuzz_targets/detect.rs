//! Protocol detection (`gofe_proxy::detect`), fed a client's first bytes in the pieces
//! the input names. The decision depends on the bytes, never on how they were cut:
//! the `Detector` fed piece by piece decides what `classify` decides on the bytes up to
//! that point and on all of them; `detect` reading the same pieces (then an end of
//! stream, or a stall until its deadline) decides the same, hands back exactly the
//! bytes it read, and never panics.
#![no_main]

use gofe_fuzz::Pieces;
use gofe_proxy::detect::{Detector, MAX_DETECT_BYTES, Protocol, classify, detect};
use libfuzzer_sys::fuzz_target;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};

/// A client whose bytes arrive in the given pieces, then end or stall.
struct Client {
    pieces: VecDeque<Vec<u8>>,
    stall: bool,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.pieces.pop_front() {
            Some(mut piece) => {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.pieces.push_front(piece.split_off(n));
                }
                Poll::Ready(Ok(()))
            }
            // Nothing wakes a stalled read: the deadline ends it (the clock is paused
            // and jumps to the next timer).
            None if self.stall => Poll::Pending,
            None => Poll::Ready(Ok(())),
        }
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Pieces::parse(data) else {
        return;
    };
    let bytes = &input.bytes[..input.bytes.len().min(MAX_DETECT_BYTES)];
    let lengths = input.lengths();

    let mut detector = Detector::default();
    let mut decided: Option<(usize, Protocol)> = None;
    let mut end = 0;
    for l in &lengths {
        end = (end + l).min(bytes.len());
        if let Some(p) = detector.feed(&bytes[..end]) {
            decided = Some((end, p));
            break;
        }
    }
    match &decided {
        Some((at, p)) => {
            assert_eq!(
                classify(&bytes[..*at]).as_ref(),
                Some(p),
                "fed in pieces {lengths:?} the detector decided at {at} bytes what the same bytes at once do not"
            );
            assert_eq!(
                classify(bytes).as_ref(),
                Some(p),
                "decided at {at} bytes, but the whole input says otherwise"
            );
        }
        None => assert_eq!(
            classify(bytes),
            None,
            "undecided in pieces {lengths:?}, decided at once"
        ),
    }

    for stall in [false, true] {
        let mut pieces = VecDeque::new();
        let mut at = 0;
        for l in &lengths {
            let to = (at + l).min(bytes.len());
            pieces.push_back(bytes[at..to].to_vec());
            at = to;
        }
        let mut client = Client { pieces, stall };
        let got = RUNTIME
            .with(|rt| rt.block_on(detect(&mut client, Duration::from_secs(10))))
            .expect("reading from memory does not fail");
        assert!(
            bytes.starts_with(&got.prefix),
            "the bytes handed on are the bytes read, in order"
        );
        match &decided {
            Some((_, p)) => {
                assert_eq!(&got.protocol, p, "detect() and the detector disagree");
                assert!(!got.timed_out);
            }
            None => {
                assert_eq!(&got.prefix[..], bytes, "undecided: everything was read");
                // A buffer full stops detection before any deadline.
                assert_eq!(got.timed_out, stall && bytes.len() < MAX_DETECT_BYTES);
            }
        }
    }
});
