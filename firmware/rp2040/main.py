"""RP2040 push-to-talk button for the appliance: a USB keyboard with one key, F13.

MicroPython 1.23 or newer on a Raspberry Pi Pico (or any RP2040 board). The board
enumerates as the USB keyboard "appliance appliance-ptt"; holding the button holds F13
down, which the appliance reads with `[ptt] backend = "evdev"` (see README, Push-to-talk).

Install (from a computer with the Pico plugged in):
    pip install mpremote
    mpremote mip install usb-device-keyboard
    mpremote cp firmware/rp2040/main.py :main.py
    mpremote reset

Wiring: the button between GP15 (pin 20) and GND (pin 18); the internal pull-up holds the
line high. The on-board LED lights while the key is down.
"""

import time

import usb.device
from machine import Pin
from usb.device.keyboard import KeyboardInterface

KEY_F13 = 0x68  # HID usage ID; Linux reports it as KEY_F13 (183)
BUTTON = Pin(15, Pin.IN, Pin.PULL_UP)
LED = Pin("LED", Pin.OUT)
DEBOUNCE_MS = 20  # the level must hold this long before it counts
POLL_MS = 5


def main():
    keyboard = KeyboardInterface()
    # builtin_driver keeps the MicroPython REPL on USB beside the keyboard
    usb.device.get().init(
        keyboard,
        builtin_driver=True,
        manufacturer_str="appliance",
        product_str="appliance-ptt",
    )
    while not keyboard.is_open():
        time.sleep_ms(100)
    pressed = False
    level = BUTTON.value()
    changed_at = time.ticks_ms()
    while True:
        now = time.ticks_ms()
        sample = BUTTON.value()
        if sample != level:
            level, changed_at = sample, now
        elif time.ticks_diff(now, changed_at) >= DEBOUNCE_MS and (level == 0) != pressed:
            pressed = level == 0
            keyboard.send_keys([KEY_F13] if pressed else [])
            LED.value(pressed)
        time.sleep_ms(POLL_MS)


main()
