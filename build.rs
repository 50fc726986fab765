//! Compiles the platform's gRPC services and the bus message format from `proto/`. protoc comes
//! from the `protoc-bin-vendored` crate, so a fresh machine builds without a system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let protos = [
        "proto/clients/v1/clients.proto",
        "proto/channels/v1/channels.proto",
        "proto/common/v1/common.proto",
        "proto/domains/v1/domains.proto",
        "proto/messaging/messaging.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_build::configure()
        .bytes(["."])
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
