//! The gRPC code of the examples is generated from
//! `examples/proto/payments.proto` by a pure-Rust protobuf compiler (protox)
//! and committed, so neither the build nor a user needs `protoc`. This test
//! regenerates it and fails when the committed files are stale; run it with
//! `REGENERATE_PROTO=1` to rewrite them.

use std::path::Path;

use prost::Message;

#[test]
fn the_committed_grpc_code_matches_the_proto() {
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proto");
    let descriptors = protox::compile([proto_dir.join("payments.proto")], [&proto_dir]).expect("compile the proto");
    let out = std::env::temp_dir().join(format!("grpc_codegen_{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out)
        .compile_fds(descriptors.clone())
        .expect("generate the code");
    let generated = std::fs::read_to_string(out.join("payments.v1.rs")).unwrap();
    let descriptor_bytes = descriptors.encode_to_vec();
    std::fs::remove_dir_all(&out).unwrap();

    let code_path = proto_dir.join("payments.v1.rs");
    let descriptor_path = proto_dir.join("payments_descriptor.bin");
    if std::env::var_os("REGENERATE_PROTO").is_some() {
        std::fs::write(&code_path, &generated).unwrap();
        std::fs::write(&descriptor_path, &descriptor_bytes).unwrap();
    }
    let committed = std::fs::read_to_string(&code_path).unwrap_or_default();
    let committed_descriptor = std::fs::read(&descriptor_path).unwrap_or_default();
    assert!(
        committed == generated && committed_descriptor == descriptor_bytes,
        "examples/proto is stale: run `REGENERATE_PROTO=1 cargo test --test grpc_codegen` and commit the result"
    );
}
