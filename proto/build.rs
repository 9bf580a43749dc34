//! Compiles `chat/v1/*.proto` with the vendored `protoc`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=chat");
    tonic_prost_build::configure().compile_protos(&["chat/v1/chat.proto", "chat/v1/fanout.proto"], &["."])?;
    Ok(())
}
