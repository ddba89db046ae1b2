//! A serial line as an async byte stream.
//!
//! ```text
//!  SerialConfig ─open(2) O_NOCTTY|O_NONBLOCK─▶ tcgetattr ─raw + framing + speed─▶ tcsetattr ─▶ Async<File>
//! ```
//!
//! Termios comes from `rustix`, which is already in our tree beneath
//! async-io and polling: on Linux it makes the system calls itself, so the
//! agent pulls in no C termios wrapper and no libudev (the `serialport`
//! crate links libudev by default). Speeds are set through `termios2`, so
//! any integer baud rate the driver accepts works, not only the `B*` table.
//!
//! The line is put in raw mode: no echo, no canonical line editing, no
//! signals, no CR/LF translation on input or output, 8-bit clean. Every
//! byte value passes, 0x00, 0xFF and, unless software flow control is
//! configured, 0x11/0x13 (XON/XOFF) too.
//!
//! What this module does not do: find a device by USB id, or notice the
//! device node coming back after it vanished. A read that returns end of
//! file or an error means the line is gone; the agent reopens it.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_io::Async;
use futures_lite::{AsyncRead, AsyncWrite};
use rustix::fs::{Mode, OFlags};
use rustix::termios::{self, ControlModes, InputModes, OptionalActions, SpecialCodeIndex, Termios};

use crate::config::{FlowControl, Parity, SerialConfig};

/// An open serial line in raw mode. Clones share the one file descriptor,
/// so one task can read while another writes, as with a TCP socket; the
/// line closes when the last clone drops.
#[derive(Clone)]
pub struct SerialPort {
    file: Arc<Async<File>>,
}

impl SerialPort {
    /// Opens `config.path` and applies its settings. Fails with the OS
    /// error if the node is missing (`ENOENT`), busy, or not a terminal
    /// (`ENOTTY`).
    pub fn open(config: &SerialConfig) -> io::Result<SerialPort> {
        // O_NOCTTY: the agent must never acquire the line as its controlling
        // terminal (a hangup would then signal it). O_NONBLOCK: open must not
        // wait for carrier detect, and async-io needs it anyway.
        let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::open(config.path.as_str(), flags, Mode::empty())?;
        let mut settings = termios::tcgetattr(&fd)?;
        configure(&mut settings, config)?;
        termios::tcsetattr(&fd, OptionalActions::Now, &settings)?;
        // Other programs (a getty, ModemManager) opening the line too would
        // each see part of its bytes. Refused only for non-root openers,
        // which is who they usually are; not fatal where unsupported.
        let _ = termios::ioctl_tiocexcl(&fd);
        Ok(SerialPort { file: Arc::new(Async::new(File::from(fd))?) })
    }

    /// The settings the kernel holds for the line now, to check what
    /// [`SerialPort::open`] applied.
    pub fn settings(&self) -> io::Result<Termios> {
        Ok(termios::tcgetattr(self.file.get_ref())?)
    }
}

/// Turns `settings` into raw mode with the configured framing, flow
/// control and speed. Pure apart from the speed check, which asks the
/// platform's encoding whether it can express `config.baud`.
pub fn configure(settings: &mut Termios, config: &SerialConfig) -> io::Result<()> {
    // cfmakeraw: clears ECHO, ICANON, ISIG, IEXTEN, OPOST, ICRNL, INLCR,
    // IGNCR, ISTRIP, IXON, BRKINT, PARMRK and sets CS8.
    settings.make_raw();
    settings.control_modes -= ControlModes::CSIZE
        | ControlModes::PARENB
        | ControlModes::PARODD
        | ControlModes::CSTOPB
        | ControlModes::CRTSCTS;
    // CREAD: receive at all. CLOCAL: ignore modem lines, so a line without
    // DCD wired neither blocks nor hangs up.
    settings.control_modes |= ControlModes::CREAD | ControlModes::CLOCAL;
    settings.control_modes |= match config.data_bits {
        5 => ControlModes::CS5,
        6 => ControlModes::CS6,
        7 => ControlModes::CS7,
        // The config accepts only 5..=8.
        _ => ControlModes::CS8,
    };
    if config.stop_bits == 2 {
        settings.control_modes |= ControlModes::CSTOPB;
    }
    settings.input_modes -=
        InputModes::INPCK | InputModes::IXON | InputModes::IXOFF | InputModes::IXANY;
    match config.parity {
        Parity::None => {}
        // INPCK: check parity on input; a bad byte then reads as 0x00
        // (PARMRK and IGNPAR stay clear), as the serialport crate does.
        Parity::Even => {
            settings.control_modes |= ControlModes::PARENB;
            settings.input_modes |= InputModes::INPCK;
        }
        Parity::Odd => {
            settings.control_modes |= ControlModes::PARENB | ControlModes::PARODD;
            settings.input_modes |= InputModes::INPCK;
        }
    }
    match config.flow_control {
        FlowControl::None => {}
        FlowControl::Software => settings.input_modes |= InputModes::IXON | InputModes::IXOFF,
        FlowControl::Hardware => settings.control_modes |= ControlModes::CRTSCTS,
    }
    // A read returns as soon as one byte is there; we never block in read
    // (O_NONBLOCK), so VTIME would only delay wakeups.
    settings.special_codes[SpecialCodeIndex::VMIN] = 1;
    settings.special_codes[SpecialCodeIndex::VTIME] = 0;
    settings.set_speed(config.baud)?;
    Ok(())
}

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SerialPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.file).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the kernel's queue; waiting for them to leave
        // the UART (tcdrain) would block the executor thread.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A serial line has no half-close; it closes when the last clone
        // drops. Whoever pumps it decides what the far end's finish means.
        Poll::Ready(Ok(()))
    }
}
