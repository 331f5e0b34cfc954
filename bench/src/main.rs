//! herd's load benchmark against its peers. See `bench/README.md`.
//!
//! ```sh
//! cargo run --release --manifest-path bench/Cargo.toml -- run            # full run (~10 min)
//! cargo run --release --manifest-path bench/Cargo.toml -- run --smoke    # CI smoke (~30 s)
//! ```

mod apps;
mod driver;
mod proc_stat;

const USAGE: &str = "\
usage:
  herd-bench run [--smoke] [--rounds N] [--duration SECS] [--connections 64,256]
                 [--apps herd,tower-sessions,limit,getset,plain] [--routes counter,rmw,read,untouched]
                 [--sessions N] [--wrk PATH] [--redis-server PATH] [--multi-worker-bin PATH]
                 [--multi-workers 1,2,4]
  herd-bench serve --app herd|tower-sessions|limit|getset|plain --port PORT --redis URL";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("run") => driver::Options::parse(&args[1..]).and_then(driver::run),
        _ => Err(USAGE.into()),
    };
    if let Err(e) = result {
        eprintln!("herd-bench: {e}");
        std::process::exit(1);
    }
}

fn serve(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (mut app, mut port, mut redis) = (None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--app" => app = Some(value.clone()),
            "--port" => port = Some(value.parse::<u16>()?),
            "--redis" => redis = Some(value.clone()),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}").into()),
        }
    }
    let (Some(app), Some(port), Some(redis)) = (app, port, redis) else {
        return Err(USAGE.into());
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(apps::serve(&app, port, &redis))
}
