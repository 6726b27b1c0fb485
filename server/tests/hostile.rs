//! Hostile and odd input against a real server with the default settings
//! (auth off, as a new user tries it): a table of images and requests, each
//! with the status it must get and what the message must say. Afterwards
//! the server is still serving and its memory stayed bounded.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{TestServer, checkpoint, database_url, vm_rss_kib, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_server::Settings;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The settings a new user starts with: defaults, auth off.
fn default_settings(options: &PgConnectOptions, model: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.database.url = database_url(options);
    s.model.path = model.to_owned();
    s.auth.enabled = false;
    s.server.health_check_interval_ms = 200;
    s.database.migrate_on_start = true;
    s
}

/// A PNG whose IHDR declares `width` x `height` 8-bit RGB pixels and whose
/// IDAT holds `rows` rows of zeros (fewer than `height`: a truncated image,
/// refused by the header checks before it would matter), then `extra`
/// chunks. Zeros deflate about 1000:1: this is what a decompression bomb is.
fn png(width: u32, height: u32, rows: u32, extra: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        png_chunk(&mut out, kind, data);
    }
    let row = 1 + 3 * width as usize;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; row.min(1 << 20)];
    let mut left = rows as usize * row;
    while left > 0 {
        let n = left.min(zeros.len());
        z.write_all(&zeros[..n]).expect("deflate");
        left -= n;
    }
    png_chunk(&mut out, b"IDAT", &z.finish().expect("deflate"));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = 0xFFFF_FFFFu32;
    for &b in &out[start..] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    out.extend_from_slice(&(!crc).to_be_bytes());
}

/// A real image of `width` x `height` in `format`.
fn encoded(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 7) as u8, ((x ^ y) * 5) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// `jpeg` with the dimensions of its first SOF0/SOF2 segment replaced.
fn jpeg_declaring(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2))
        .expect("a SOF marker");
    // FF C0, length (2), precision (1), height (2), width (2)
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

/// A BMP header declaring `width` x `height` (negative: top-down rows).
fn bmp_declaring(width: i32, height: i32) -> Vec<u8> {
    let mut bmp = encoded(2, 2, image::ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&width.to_le_bytes());
    bmp[22..26].copy_from_slice(&height.to_le_bytes());
    bmp
}

/// zlib of `n` zeros.
fn deflated_zeros(n: usize) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&vec![0u8; n]).expect("deflate");
    z.finish().expect("deflate")
}

/// What a call must answer: the code and a piece of the message.
type Expect = (Code, &'static str);
const OK: Expect = (Code::Ok, "");

fn image(data: Vec<u8>) -> pb::Image {
    pb::Image { data }
}

async fn embed(client: &mut HandIdClient<Channel>, images: Vec<Vec<u8>>) -> (Code, String) {
    let request = pb::EmbedRequest {
        images: images.into_iter().map(image).collect(),
    };
    match client.embed(request).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

async fn enroll(client: &mut HandIdClient<Channel>, subject: &str, images: Vec<Vec<u8>>) -> (Code, String) {
    let request = pb::EnrollRequest {
        gallery_id: "hostile".to_owned(),
        subject_id: subject.to_owned(),
        images: images.into_iter().map(image).collect(),
        idempotency_key: String::new(),
    };
    match client.enroll(request).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

async fn identify(client: &mut HandIdClient<Channel>, probe: Vec<u8>) -> (Code, String) {
    let request = pb::IdentifyRequest {
        gallery_id: "hostile".to_owned(),
        image: Some(image(probe)),
        top_k: 1,
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.0)),
        }),
    };
    match client.identify(request).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

fn check(what: &str, got: (Code, String), want: Expect) {
    assert_eq!(got.0, want.0, "{what}: {}", got.1);
    assert!(
        got.1.contains(want.1),
        "{what}: the message should say {:?}: {:?}",
        want.1,
        got.1
    );
}

#[sqlx::test(migrations = false)]
async fn hostile_images_get_their_status_and_the_server_survives(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let server = TestServer::start(default_settings(&options, dir.path())).await;
    let mut client = server.client().await.max_encoding_message_size(64 << 20);
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    // Warm-up: the first calls allocate what every later call reuses.
    check("control photo", embed(&mut client, vec![photo.clone()]).await, OK);
    check(
        "enrol the control photo",
        enroll(&mut client, "control", vec![photo.clone()]).await,
        OK,
    );
    let before = vm_rss_kib();

    let jpeg = encoded(96, 80, image::ImageFormat::Jpeg);
    let side = (
        Code::InvalidArgument,
        "a side longer than the limit of 16384 pixels",
    );
    let elongated = (Code::InvalidArgument, "more elongated than the limit of 8:1");
    let small = (Code::InvalidArgument, "too small to show a hand");
    let undecodable = (Code::InvalidArgument, "is not a decodable image");
    let images: Vec<(&str, Vec<u8>, Expect)> = vec![
        // The two: within max_pixels, one side in the tens of millions.
        ("PNG 30000000x1", png(30_000_000, 1, 1, &[]), side),
        ("PNG 1x30000000", png(1, 30_000_000, 1_000, &[]), side),
        ("PNG 16000x1000 (16:1)", png(16_000, 1_000, 1, &[]), elongated),
        (
            "PNG 64x513 (just over 8:1)",
            encoded(64, 513, image::ImageFormat::Png),
            elongated,
        ),
        (
            "PNG 64x512 (8:1 exactly)",
            encoded(64, 512, image::ImageFormat::Png),
            OK,
        ),
        ("PNG 1x1", encoded(1, 1, image::ImageFormat::Png), small),
        ("PNG 63x300", encoded(63, 300, image::ImageFormat::Png), small),
        (
            "PNG 64x64 (the minimum)",
            encoded(64, 64, image::ImageFormat::Png),
            OK,
        ),
        (
            "PNG 0x100",
            png(0, 100, 0, &[]),
            (Code::InvalidArgument, "not a decodable image"),
        ),
        (
            "PNG bomb 6000x6000 (zeros, within every limit)",
            png(6_000, 6_000, 6_000, &[]),
            OK,
        ),
        ("PNG declaring 20000x20000", png(20_000, 20_000, 1, &[]), side),
        (
            "PNG 7000x7000 (49 M pixels, over 40 M)",
            png(7_000, 7_000, 1, &[]),
            (Code::InvalidArgument, "over the limit of 40000000 pixels"),
        ),
        (
            "PNG with a zTXt chunk inflating to 64 MiB",
            png(
                96,
                96,
                96,
                &[(
                    b"zTXt",
                    [b"Comment\0\0".as_slice(), &deflated_zeros(64 << 20)].concat(),
                )],
            ),
            OK,
        ),
        (
            "PNG with an IDAT length of 2 GiB",
            {
                let mut p = png(96, 96, 96, &[]);
                let idat = p.windows(4).position(|w| w == b"IDAT").expect("IDAT");
                p[idat - 4..idat].copy_from_slice(&0x7FFF_FFFFu32.to_be_bytes());
                p
            },
            undecodable,
        ),
        (
            "PNG with a damaged CRC",
            {
                let mut p = encoded(96, 96, image::ImageFormat::Png);
                let at = p.len() - 20;
                p[at] ^= 0xFF;
                p
            },
            undecodable,
        ),
        (
            "JPEG declaring 65535x65535",
            jpeg_declaring(&jpeg, 65_535, 65_535),
            side,
        ),
        ("JPEG declaring 65535x8", jpeg_declaring(&jpeg, 65_535, 8), side),
        ("JPEG declaring 0x0", jpeg_declaring(&jpeg, 0, 0), undecodable),
        ("JPEG cut in half", jpeg[..jpeg.len() / 2].to_vec(), undecodable),
        ("BMP declaring 60000x60000", bmp_declaring(60_000, 60_000), side),
        (
            "BMP declaring 100x-2147483648",
            bmp_declaring(100, i32::MIN),
            undecodable,
        ),
        ("BMP declaring -5x100", bmp_declaring(-5, 100), undecodable),
        (
            "PPM declaring 30000000x1",
            b"P6\n30000000 1\n255\n\0\0\0".to_vec(),
            side,
        ),
        (
            "PGM declaring 16384x16384 (268 M pixels)",
            b"P5\n16384 16384\n255\n\0".to_vec(),
            (Code::InvalidArgument, "over the limit of 40000000 pixels"),
        ),
        (
            "PGM declaring 99999999999x1",
            b"P5\n99999999999 1\n255\n\0".to_vec(),
            undecodable,
        ),
        (
            "GIF (not an accepted format)",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            undecodable,
        ),
        (
            "4 KiB of noise",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            undecodable,
        ),
        ("empty", Vec::new(), (Code::InvalidArgument, "is empty")),
        (
            "16 MiB + 1 byte",
            vec![0xFF; (16 << 20) + 1],
            (Code::InvalidArgument, "over the limit of 16777216"),
        ),
    ];
    for (what, bytes, want) in images {
        let started = Instant::now();
        check(what, embed(&mut client, vec![bytes.clone()]).await, want);
        if want.0 != Code::Ok {
            // Refusals come from the header: at once, and the same on every
            // call that takes images.
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what} took {:?}",
                started.elapsed()
            );
            check(what, identify(&mut client, bytes.clone()).await, want);
            check(
                what,
                enroll(&mut client, "refused", vec![photo.clone(), bytes]).await,
                (want.0, "image 1 "),
            );
        }
    }
    check(
        "17 images in one Enroll",
        enroll(&mut client, "many", vec![photo.clone(); 17]).await,
        (
            Code::InvalidArgument,
            "17 images in one call, over the limit of 16",
        ),
    );
    // Nothing refused was stored.
    let refused = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "hostile".to_owned(),
            subject_id: "refused".to_owned(),
        })
        .await
        .expect_err("never enrolled");
    assert_eq!(refused.code(), Code::NotFound);

    // Alive, and its memory bounded: a decoded 36 M pixel image is about
    // 100 MiB; the attacks above, unbounded, took gigabytes.
    wait_for_health(&server, ServingStatus::Serving).await;
    check("control photo after", embed(&mut client, vec![photo]).await, OK);
    let after = vm_rss_kib();
    eprintln!(
        "[hostile] VmRSS before {} MiB, after {} MiB",
        before / 1024,
        after / 1024
    );
    assert!(
        after < before + 512 * 1024,
        "VmRSS grew from {before} KiB to {after} KiB"
    );
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_decode_stops_when_its_call_times_out(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut s = default_settings(&options, dir.path());
    // One decode at a time: a decode that outlived its call would hold the
    // only slot.
    s.limits.decode_concurrency = 1;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    check("warm-up", embed(&mut client, vec![photo.clone()]).await, OK);
    // 40 M pixels of zeros: a short decode (inflating 120 MB, about 0.1 s
    // here), then a long resize. How long both take, done in full here, is
    // the yardstick.
    let bomb = png(6_324, 6_324, 6_324, &[]);
    let started = Instant::now();
    let decoded = handid_model::decode(&bomb, &handid_model::DecodeLimits::default()).expect("decode");
    let pixels = handid_model::Preprocess::Clip { size: 32 }
        .apply(&decoded)
        .expect("preprocess");
    drop((decoded, pixels));
    let full = started.elapsed();
    assert!(
        full > Duration::from_millis(450),
        "the yardstick is too short: {full:?}"
    );
    // The client gives up while the bomb inflates; the server drops the
    // call (tonic answers a client deadline with CANCELLED).
    let mut request = tonic::Request::new(pb::EmbedRequest {
        images: vec![image(bomb)],
    });
    request.set_timeout(Duration::from_millis(20));
    let status = client.embed(request).await.expect_err("past its deadline");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    let started = Instant::now();
    check("a photo right after", embed(&mut client, vec![photo]).await, OK);
    let next = started.elapsed();
    eprintln!("[hostile] full decode {full:?}; the next call after a cancelled one {next:?}");
    // Had the cancelled decode run on, the photo would have waited most of
    // `full` for the only slot.
    assert!(
        next < full / 3,
        "the photo waited {next:?}: the cancelled decode ({full:?} when complete) kept the slot"
    );
    server.stop().await.expect("graceful stop");
}

/// A protobuf length-delimited field: tag, length, bytes.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut n = bytes.len();
    loop {
        let low = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            break;
        }
        out.push(low | 0x80);
    }
    out.extend_from_slice(bytes);
    out
}

#[sqlx::test(migrations = false)]
async fn hostile_requests_get_their_status(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let server = TestServer::start(default_settings(&options, dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await
        .expect("channel");
    let mut admin = handid_proto::v1::admin_client::AdminClient::new(channel.clone());
    let photo = common::people(1, 1).remove(0).1.remove(0);
    check(
        "enrol a subject",
        enroll(&mut client, "known", vec![photo.clone()]).await,
        OK,
    );
    let bad = Code::InvalidArgument;
    let not_found = Code::NotFound;

    // Bodies that are not the method's protobuf message.
    let enroll_path = "/handid.v1.HandId/Enroll";
    let raw: Vec<(&str, &'static str, Vec<u8>, Expect)> = vec![
        (
            "three 0xFF bytes",
            enroll_path,
            vec![0xFF; 3],
            (bad, "not a valid handid.v1.HandId/Enroll message"),
        ),
        (
            "a gallery_id that is not UTF-8",
            enroll_path,
            field(1, &[0xC3, 0x28]),
            (bad, "UTF-8"),
        ),
        (
            "a field claiming 2 GiB",
            "/handid.v1.HandId/Identify",
            vec![0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x07, b'g'],
            (bad, "not a valid handid.v1.HandId/Identify message"),
        ),
        (
            "a varint of eleven bytes",
            "/handid.v1.HandId/Identify",
            [vec![0x18], vec![0xFF; 10], vec![0x01]].concat(),
            (bad, "not a valid"),
        ),
        (
            "wire type 7",
            "/handid.v1.HandId/Verify",
            vec![0x0F, 0x00],
            (bad, "not a valid"),
        ),
        (
            "10000 empty images",
            "/handid.v1.HandId/Embed",
            field(1, &[]).repeat(10_000),
            (bad, "10000 images in one call, over the limit of 16"),
        ),
        (
            "only unknown fields",
            "/handid.v1.HandId/Verify",
            field(15, b"who knows"),
            (bad, "gallery_id is empty"),
        ),
        (
            "a method that does not exist",
            "/handid.v1.HandId/Nope",
            Vec::new(),
            (Code::Unimplemented, ""),
        ),
    ];
    for (what, path, body, want) in raw {
        check(what, common::raw_call(channel.clone(), path, body).await, want);
    }

    let identify_with =
        |gallery: &str, top_k: u32, rule: Option<pb::decision_rule::Rule>| pb::IdentifyRequest {
            gallery_id: gallery.to_owned(),
            image: Some(image(photo.clone())),
            top_k,
            rule: rule.map(|r| pb::DecisionRule { rule: Some(r) }),
        };
    let status = |r: Result<tonic::Response<pb::IdentifyResponse>, tonic::Status>| match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    };
    use pb::decision_rule::Rule::{TargetFmr, Threshold};
    let identify_cases: Vec<(&str, pb::IdentifyRequest, Expect)> = vec![
        (
            "a NUL in gallery_id",
            identify_with("hostile\0", 1, None),
            (bad, "gallery_id contains a NUL character at position 7"),
        ),
        (
            "an escape in gallery_id",
            identify_with("\u{1b}[2J", 1, None),
            (bad, "gallery_id contains the control character U+001B"),
        ),
        (
            "a non-ASCII gallery_id",
            identify_with("galerie-é", 1, None),
            (bad, "may only contain"),
        ),
        (
            "a 129-character gallery_id",
            identify_with(&"g".repeat(129), 1, None),
            (bad, "longer than 128 characters"),
        ),
        (
            "top_k 0",
            identify_with("hostile", 0, None),
            (bad, "top_k must be 1..=100, got 0"),
        ),
        (
            "top_k u32::MAX",
            identify_with("hostile", u32::MAX, None),
            (bad, "got 4294967295"),
        ),
        (
            "threshold NaN",
            identify_with("hostile", 1, Some(Threshold(f32::NAN))),
            (bad, "threshold must be a finite number"),
        ),
        (
            "threshold -inf",
            identify_with("hostile", 1, Some(Threshold(f32::NEG_INFINITY))),
            (bad, "threshold must be a finite number"),
        ),
        (
            "target_fmr NaN",
            identify_with("hostile", 1, Some(TargetFmr(f64::NAN))),
            (bad, "target_fmr must be a rate between 0 and 1"),
        ),
        (
            "target_fmr 2",
            identify_with("hostile", 1, Some(TargetFmr(2.0))),
            (bad, "target_fmr must be a rate between 0 and 1"),
        ),
        (
            "an uncalibrated target_fmr",
            identify_with("hostile", 1, Some(TargetFmr(0.5))),
            (bad, "no threshold calibrated at FMR 5e-1"),
        ),
        (
            "no image",
            pb::IdentifyRequest {
                image: None,
                ..identify_with("hostile", 1, None)
            },
            (bad, "image is required"),
        ),
        (
            "an unknown gallery",
            identify_with("nobody-here", 1, None),
            (not_found, "gallery \"nobody-here\" not found"),
        ),
    ];
    for (what, request, want) in identify_cases {
        check(what, status(client.identify(request).await), want);
    }

    let enroll_with = |subject: &str, key: &str| pb::EnrollRequest {
        gallery_id: "hostile".to_owned(),
        subject_id: subject.to_owned(),
        images: vec![image(photo.clone())],
        idempotency_key: key.to_owned(),
    };
    let enroll_cases: Vec<(&str, pb::EnrollRequest, Expect)> = vec![
        (
            "a NUL in subject_id",
            enroll_with("a\0b", ""),
            (bad, "subject_id contains a NUL character at position 1"),
        ),
        (
            "a NUL in the idempotency key",
            enroll_with("s", "retry\0"),
            (bad, "idempotency_key contains a NUL character at position 5"),
        ),
        (
            "a 257-character idempotency key",
            enroll_with("s", &"k".repeat(257)),
            (bad, "idempotency_key is longer than 256 characters"),
        ),
        (
            "no images",
            pb::EnrollRequest {
                images: Vec::new(),
                ..enroll_with("s", "")
            },
            (bad, "at least one image is required"),
        ),
    ];
    for (what, request, want) in enroll_cases {
        let got = match client.enroll(request).await {
            Ok(_) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_owned()),
        };
        check(what, got, want);
    }

    let other: Vec<(&str, (Code, String), Expect)> = vec![
        (
            "Verify without an image",
            match client
                .verify(pb::VerifyRequest {
                    gallery_id: "hostile".to_owned(),
                    subject_id: "known".to_owned(),
                    image: None,
                    rule: None,
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "image is required"),
        ),
        (
            "DeleteSubject in an unknown gallery",
            match client
                .delete_subject(pb::DeleteSubjectRequest {
                    gallery_id: "nobody-here".to_owned(),
                    subject_id: "x".to_owned(),
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (not_found, "gallery \"nobody-here\" not found"),
        ),
        (
            "GetSubject with a NUL",
            match client
                .get_subject(pb::GetSubjectRequest {
                    gallery_id: "hostile".to_owned(),
                    subject_id: "known\0".to_owned(),
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "subject_id contains a NUL character"),
        ),
        (
            "ListSubjects of 1001",
            match client
                .list_subjects(pb::ListSubjectsRequest {
                    gallery_id: "hostile".to_owned(),
                    page_size: 1001,
                    page_token: String::new(),
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "page_size must be 0 (default) to 1000, got 1001"),
        ),
        (
            "a page token of a NUL",
            match client
                .list_subjects(pb::ListSubjectsRequest {
                    gallery_id: "hostile".to_owned(),
                    page_size: 0,
                    page_token: "p1.00".to_owned(),
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "page_token is not a token this server issued"),
        ),
        (
            "ReloadModel with a NUL in the path",
            match admin
                .reload_model(pb::ReloadModelRequest {
                    path: "/tmp/\0".to_owned(),
                    mode: 0,
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "path contains a NUL character at position 5"),
        ),
        (
            "ReloadModel mode 42",
            match admin
                .reload_model(pb::ReloadModelRequest {
                    path: String::new(),
                    mode: 42,
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "mode 42 is not a ReloadMode"),
        ),
        (
            "ReloadModel of a folder that does not exist",
            match admin
                .reload_model(pb::ReloadModelRequest {
                    path: "/nonexistent/checkpoint".to_owned(),
                    mode: 0,
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "checkpoint /nonexistent/checkpoint refused"),
        ),
        (
            "ReloadModel of a file",
            match admin
                .reload_model(pb::ReloadModelRequest {
                    path: "/etc/hostname".to_owned(),
                    mode: 0,
                })
                .await
            {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            },
            (bad, "checkpoint /etc/hostname refused"),
        ),
    ];
    for (what, got, want) in other {
        check(what, got, want);
    }

    // Still serving, and the one good enrolment is all there is.
    wait_for_health(&server, ServingStatus::Serving).await;
    check(
        "an Identify after all that",
        identify(&mut client, photo).await,
        OK,
    );
    let page = client
        .list_subjects(pb::ListSubjectsRequest {
            gallery_id: "hostile".to_owned(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = page.subjects.iter().map(|s| s.subject_id.as_str()).collect();
    assert_eq!(ids, ["known"]);
    server.stop().await.expect("graceful stop");
}

#[test]
fn migrate_help_does_not_print_the_database_url() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .args(["migrate", "--help"])
        .env("DATABASE_URL", "postgres://owner:s3cret-pa55@db:5432/handid")
        .output()
        .expect("run handid-server migrate --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("DATABASE_URL"), "the variable is named: {text}");
    assert!(!text.contains("s3cret-pa55"), "the help printed the URL: {text}");
}
