//! Pass the directory of libsqlite3-sys's bundled `sqlite3.c` on to the
//! benchmark (its build script announces it as `DEP_SQLITE3_INCLUDE`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_SQLITE3_INCLUDE");
    if let Ok(dir) = std::env::var("DEP_SQLITE3_INCLUDE") {
        println!("cargo:rustc-env=HOTPATCH_BENCH_SQLITE_DIR={dir}");
    }
}
