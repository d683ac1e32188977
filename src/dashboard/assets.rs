//! The dashboard's built front end (`dashboard/dist/`), embedded in the binary at compile time
//! by `rust-embed` (in debug builds too, so tests serve exactly what a release serves).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The files of `dashboard/dist/`, built from `dashboard/src/` by `dashboard/build.mjs`.
#[derive(rust_embed::Embed)]
#[folder = "dashboard/dist/"]
struct Dist;

/// `GET /`, `/dashboard/`: the page.
pub async fn index() -> Response {
    serve("index.html")
}

/// `GET /dashboard/<file>`: one built file, 404 for any other path.
pub async fn file(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn serve(name: &str) -> Response {
    match Dist::get(name) {
        Some(file) => (
            [
                (header::CONTENT_TYPE, file.metadata.mimetype().to_owned()),
                // The page and its bundle change with the binary, never under one address in
                // between: revalidate each load, which costs a local request.
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ],
            file.data,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_bundle_are_embedded() {
        let index = Dist::get("index.html").expect("dashboard/dist/index.html is built");
        let html = std::str::from_utf8(&index.data).unwrap();
        for asset in ["app.js", "app.css"] {
            assert!(html.contains(asset), "index.html loads {asset}");
            assert!(Dist::get(asset).is_some(), "{asset} is embedded");
        }
    }
}
