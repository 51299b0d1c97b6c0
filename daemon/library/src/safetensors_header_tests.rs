//! Edge cases of the safetensors header parser, one small file per case.

use super::*;

/// A file with this header JSON and `data_len` zero bytes of data.
fn file(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

fn check_err(bytes: &[u8], expected: &[&str]) {
    let err = parse_file(bytes).expect_err("must be refused");
    let msg = err.to_string();
    for e in expected {
        assert!(msg.contains(e), "{msg:?} lacks {e:?}");
    }
}

#[test]
fn accepts_a_well_formed_file() {
    let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let header = parse_file(&file(h, 12)).unwrap();
    assert_eq!(
        header.metadata,
        vec![("format".to_owned(), "pt".to_owned())]
    );
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b", "a"], "file order is kept");
    assert_eq!(header.tensors[0].dtype, Dtype::F16);
    assert_eq!((header.tensors[1].start, header.tensors[1].end), (0, 8));
    assert_eq!(header.data_start, 8 + h.len() as u64);
}

#[test]
fn accepts_padding_spaces_zero_sized_tensors_and_empty_headers() {
    let h = r#"{"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}   "#;
    let header = parse_file(&file(h, 1)).unwrap();
    assert_eq!(header.tensors.len(), 2);
    assert!(parse_file(&file("{}", 0)).unwrap().tensors.is_empty());
}

#[test]
fn refuses_truncated_framing() {
    check_err(&[1, 2, 3], &["truncated", "3 bytes"]);
    check_err(&[], &["truncated", "0 bytes"]);
    let mut f = file("{}", 0);
    f[0] = 200;
    check_err(&f, &["truncated", "claims 200 bytes", "only 2"]);
}

#[test]
fn refuses_absurd_header_length() {
    let mut f = file("{}", 0);
    f[..8].copy_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
    check_err(&f, &["absurdly large"]);
    // Checked before the file length, so a huge claim on a tiny file says "too large".
    f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    check_err(&f, &["absurdly large"]);
}

#[test]
fn refuses_bad_text() {
    let mut bad_utf8 = file(r#"{"a?":1}"#, 0);
    bad_utf8[8 + 3] = 0xff;
    check_err(&bad_utf8, &["not valid UTF-8", "offset 3"]);
    check_err(&file("{\"a\":", 0), &["not valid JSON"]);
    check_err(&file("[1,2]", 0), &["not valid JSON"]);
    let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    check_err(&file(dup, 2), &["duplicate key \"a\""]);
}

#[test]
fn refuses_malformed_entries() {
    let cases: &[(&str, &str)] = &[
        (r#"{"t":[1]}"#, "must be an object"),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
            "unknown field \"x\"",
        ),
        (
            r#"{"t":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
            "unknown dtype \"F99\"",
        ),
        (
            r#"{"t":{"shape":[1],"data_offsets":[0,4]}}"#,
            "dtype missing",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            "non-negative integers",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            "two non-negative integers",
        ),
    ];
    for (h, expected) in cases {
        check_err(&file(h, 4), &["header key \"t\"", expected]);
    }
    check_err(
        &file(r#"{"__metadata__":{"k":1}}"#, 0),
        &["header key \"__metadata__\"", "not a string"],
    );
}

#[test]
fn refuses_lying_offsets() {
    let one = |dtype: &str, shape: &str, offsets: &str, data: usize| {
        file(
            &format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#),
            data,
        )
    };
    check_err(
        &one("F32", "[1]", "[4,0]", 4),
        &["tensor w", "[4, 0]", "end before they start"],
    );
    check_err(
        &one("F32", "[2]", "[0,8]", 4),
        &["tensor w", "beyond the data area of 4 bytes", "truncated"],
    );
    check_err(
        &one("F32", "[3]", "[0,8]", 8),
        &["tensor w", "span 8 bytes", "F32", "[3]", "needs 12"],
    );
    check_err(&one("BF16", "[2,2]", "[0,4]", 4), &["needs 8"]);
    // A shape whose byte size overflows must not wrap around to a matching size.
    let huge = format!("[{},{}]", u64::MAX, 4);
    check_err(&one("U8", &huge, "[0,4]", 4), &["tensor w", "span 4 bytes"]);
}

#[test]
fn refuses_overlaps_gaps_and_trailing_bytes() {
    let two = |a: &str, b: &str, data: usize| {
        file(
            &format!(
                r#"{{"a":{{"dtype":"U8","shape":[4],"data_offsets":{a}}},"b":{{"dtype":"U8","shape":[4],"data_offsets":{b}}}}}"#
            ),
            data,
        )
    };
    check_err(
        &two("[0,4]", "[2,6]", 6),
        &["tensors a and b overlap", "bytes 2..4"],
    );
    check_err(&two("[0,4]", "[0,4]", 4), &["overlap"]);
    check_err(
        &two("[0,4]", "[6,10]", 10),
        &["bytes 4..6 belong to no tensor"],
    );
    check_err(
        &two("[0,4]", "[4,8]", 9),
        &["bytes 8..9 belong to no tensor"],
    );
    assert!(
        parse_file(&two("[4,8]", "[0,4]", 8)).is_ok(),
        "order in the header does not matter"
    );
}

#[test]
fn header_len_checks_prefix_against_file_length() {
    assert_eq!(header_len(&2u64.to_le_bytes(), 10), Ok(2));
    assert_eq!(
        header_len(&3u64.to_le_bytes(), 10),
        Err(HeaderError::HeaderTruncated {
            claimed: 3,
            available: 2
        })
    );
    assert_eq!(
        header_len(&[0; 4], 4),
        Err(HeaderError::TooShort { len: 4 })
    );
}

#[test]
fn dtype_names_and_sizes() {
    for s in [
        "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32",
        "U32", "F32", "F64", "I64", "U64",
    ] {
        let d = Dtype::parse(s).unwrap();
        assert_eq!(d.as_str(), s);
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<Dtype>(&format!("\"{s}\"")).unwrap(),
            d
        );
    }
    assert_eq!(
        (
            Dtype::BF16.size_bytes(),
            Dtype::F64.size_bytes(),
            Dtype::Bool.size_bytes()
        ),
        (2, 8, 1)
    );
    assert!(
        Dtype::F16.is_lora_float() && !Dtype::F64.is_lora_float() && !Dtype::I8.is_lora_float()
    );
    assert_eq!(Dtype::parse("f32"), None, "dtype names are case-sensitive");
}
