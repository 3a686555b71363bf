//! Replays a `vhost_user_session` input outside libFuzzer, printing the script it decodes into
//! and the backend's log: `cargo run --example replay_session -- FILE`.

use outboard_fuzz::input::Input;
use outboard_fuzz::session::{play, Op, Setup, MAX_OPS};

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        eprintln!(
            "  [{} {}] {}",
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).expect("usage: replay_session FILE");
    let data = std::fs::read(path)?;
    let mut input = Input::new(&data);
    println!("{:?}", Setup::decode(&mut input));
    for i in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match Op::decode(&mut input) {
            Op::Message {
                request,
                need_reply,
                reply,
                fd_kind,
                fd_count,
                payload,
            } => {
                let name = vhost::vhost_user::message::FrontendReq::try_from(request)
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|_| format!("request {request}"));
                println!(
                    "{i}: {name} need_reply={need_reply} reply={reply} fds={fd_count}x{fd_kind:?} \
                     payload={payload:02x?}"
                );
            }
            op => println!("{i}: {op:?}"),
        }
    }
    log::set_logger(&StderrLog).expect("the only logger");
    log::set_max_level(log::LevelFilter::Debug);
    play(&data);
    println!("the session ended cleanly");
    Ok(())
}
